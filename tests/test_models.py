"""The ViT model: Table 1 sizes, shapes, pooling, position embeddings, dropout placement, initialisation."""

import math

import pytest
import torch
from torch import nn

from vit_pipelines.models import VisionTransformer, ViTConfig, fastpath
from vit_pipelines.models.posemb import posemb_sincos_2d
from vit_pipelines.models.vit import Attention


def small(**overrides) -> VisionTransformer:
    fields = dict(depth=2, width=32, mlp_dim=64, num_heads=4)
    fields.update(overrides)
    image_size = fields.pop("image_size", 32)
    return VisionTransformer(ViTConfig.from_variant("Ti/8", image_size=image_size, num_classes=7, **fields))


@pytest.mark.parametrize(("name", "millions"), [("B/16", 86), ("L/16", 307), ("H/14", 632)])
def test_parameter_counts_match_table_1(name, millions):
    with torch.device("meta"):
        model = VisionTransformer(ViTConfig.from_variant(name, image_size=224, num_classes=1000))
    count = sum(p.numel() for p in model.parameters())
    print(f"{name}: {count:,} parameters (Table 1: {millions}M)")
    assert abs(count / 1e6 - millions) / millions < 0.01


@pytest.mark.parametrize(
    ("name", "image_size", "tokens"),
    [("Ti/4", 32, 64), ("S/8", 32, 16), ("B/16", 64, 16), ("Ti/16", (48, 80), 15), ("Ti/7", (14, 35), 10)],
)
def test_variants_patch_sizes_and_non_square_images(name, image_size, tokens):
    config = ViTConfig.from_variant(name, image_size=image_size, num_classes=5, depth=1)
    model = VisionTransformer(config).eval()
    h, w = config.image_size
    out = model.forward_features(torch.randn(2, 3, h, w))
    assert out["tokens"].shape == (2, tokens + 1, config.width)
    assert out["pre_logits"].shape == (2, config.width)
    assert model(torch.randn(2, 3, h, w)).shape == (2, 5)
    assert model.patch_tokens(out).shape == (2, *config.grid_size, config.width)


def test_variant_table_and_bad_names():
    config = ViTConfig.from_variant("L/14")
    assert (config.depth, config.width, config.mlp_dim, config.num_heads) == (24, 1024, 4096, 16)
    assert config.patch_size == (14, 14)
    for bad in ("X/16", "B16", "B/", "B/x"):
        with pytest.raises(ValueError, match="variant"):
            ViTConfig.from_variant(bad)
    with pytest.raises(ValueError, match="divisible"):
        ViTConfig.from_variant("B/16", image_size=100)
    with pytest.raises(ValueError, match="pool"):
        ViTConfig.from_variant("B/16", pool="max")


def test_config_json_round_trip():
    config = ViTConfig.from_variant(
        "S/16", image_size=(64, 96), num_classes=3, posemb="sincos2d", hybrid=None
    )
    assert ViTConfig.from_dict(__import__("json").loads(config.to_json())) == config


def test_tok_pools_the_class_token_and_gap_averages_the_patches():
    tok = small(pool="tok").eval()
    out = tok.forward_features(torch.randn(3, 3, 32, 32))
    assert out["tokens"].shape[1] == 17
    torch.testing.assert_close(out["pre_logits"], out["tokens"][:, 0])
    gap = small(pool="gap").eval()
    assert gap.cls_token is None
    out = gap.forward_features(torch.randn(3, 3, 32, 32))
    assert out["tokens"].shape[1] == 16
    torch.testing.assert_close(out["pre_logits"], out["tokens"].mean(dim=1))


@pytest.mark.parametrize(
    "pool, last_block, normalized", [("tok", (3, 1, 32), (3, 32)), ("gap", (3, 16, 32), (3, 16, 32))]
)
def test_pre_logits_alone_compute_only_what_is_pooled(pool, last_block, normalized):
    """`forward_features(tokens=False)`, which `forward` uses: no `tokens`, the same `pre_logits`, logits and
    gradients; with [class]-token pooling the last block computes that token alone (its query against every token,
    through the key and value weights) and the final layer norm sees that token alone."""
    torch.manual_seed(0)
    model, images = small(pool=pool, depth=3), torch.randn(3, 3, 32, 32)
    nn.init.normal_(model.head.weight)  # vit_jax's zero head would pass no gradient back
    nn.init.normal_(model.blocks[-1].attn.qkv.bias)  # zero at vit_jax init: let the k, v bias terms count
    shapes = []
    model.blocks[-1].register_forward_hook(lambda module, args, out: shapes.append(tuple(out[0].shape)))
    model.norm.register_forward_hook(lambda module, args, out: shapes.append(tuple(args[0].shape)))
    full, alone = model.forward_features(images), model.forward_features(images, tokens=False)
    assert "tokens" not in alone and shapes[-2:] == [last_block, normalized]
    torch.testing.assert_close(alone["pre_logits"], full["pre_logits"], rtol=1e-5, atol=1e-6)
    grads = []
    for logits in (model.head(model.forward_features(images)["pre_logits"]), model(images)):
        model.zero_grad()
        logits.square().sum().backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
    torch.testing.assert_close(logits, model.head(full["pre_logits"]), rtol=1e-5, atol=1e-5)
    for name, grad in grads[0].items():
        assert grad.abs().max() > 0, name  # every parameter, the last block's included, gets a gradient
        torch.testing.assert_close(
            grads[1][name], grad, rtol=1e-4, atol=1e-5 * grad.abs().max().item(), msg=name
        )


def test_first_token_attention_drops_out_the_same_weights():
    """`fastpath.first_token_attention` folds the keys and values into the first token's query; under attention
    dropout (training) it drops the same weights as the full attention's first row, and the value bias is weighted
    by what they keep (they no longer sum to 1)."""
    attn = Attention(32, 4, dropout=0.0, attention_dropout=0.5).train()
    nn.init.normal_(attn.qkv.bias)
    x = torch.randn(3, 17, 32)
    torch.manual_seed(5)
    folded = fastpath.first_token_attention(attn, x)
    torch.manual_seed(5)
    q, k, v = attn.heads(x)
    full, _ = attn.attend(q[:, :, :1], k, v)
    torch.testing.assert_close(folded, full, rtol=1e-5, atol=1e-6)
    torch.manual_seed(6)  # another mask: another output
    assert (fastpath.first_token_attention(attn, x) - folded).abs().max() > 1e-2
    # a model cast to bfloat16, without autocast, stays in bfloat16
    attn.eval().bfloat16()
    assert fastpath.first_token_attention(attn, x.bfloat16()).dtype == torch.bfloat16


def test_representation_size_adds_a_tanh_pre_logits_layer():
    model = small(representation_size=12).eval()
    out = model.forward_features(torch.randn(2, 3, 32, 32))
    assert out["pre_logits"].shape == (2, 12)
    assert out["pre_logits"].abs().max() <= 1.0
    assert model.head.in_features == 12


@pytest.mark.parametrize("posemb", ["learn", "learn2d", "sincos2d", "none"])
def test_position_embedding_kinds(posemb):
    model = small(posemb=posemb).eval()
    images = torch.randn(2, 3, 32, 32)
    model(images)  # runs
    pe = model.position_embedding()
    expected = {"learn": (1, 17, 32), "learn2d": (1, 16, 32), "sincos2d": (1, 16, 32), "none": None}[posemb]
    assert (None if pe is None else tuple(pe.shape)) == expected
    learnable = sum(p.numel() for n, p in model.named_parameters() if "pos_embed" in n)
    assert learnable == {"learn": 17 * 32, "learn2d": (4 + 4) * 16, "sincos2d": 0, "none": 0}[posemb]


def test_posemb_without_position_information_is_permutation_equivariant():
    model = small(posemb="none", pool="gap").eval()
    patches = torch.randn(1, 3, 32, 32)
    # Swap two 8x8 patches: with no position embedding GAP pre-logits must not change.
    swapped = patches.clone()
    swapped[..., :8, :8], swapped[..., 8:16, 8:16] = patches[..., 8:16, 8:16], patches[..., :8, :8]
    a, b = model.forward_features(patches)["pre_logits"], model.forward_features(swapped)["pre_logits"]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    learned = small(posemb="learn", pool="gap").eval()
    assert not torch.allclose(
        learned.forward_features(patches)["pre_logits"], learned.forward_features(swapped)["pre_logits"]
    )


def test_learn2d_concatenates_row_and_column_halves():
    model = small(posemb="learn2d")
    pe = model.position_embedding().reshape(4, 4, 32)
    torch.testing.assert_close(pe[1, 2, :16], model.pos_embed_2d.row[0, 1, 0])
    torch.testing.assert_close(pe[1, 2, 16:], model.pos_embed_2d.col[0, 0, 2])


def test_sincos2d_matches_big_vision_formula():
    pe = posemb_sincos_2d((3, 5), 8)[0]
    omega = 1.0 / 10_000 ** torch.tensor([0.0, 1.0])  # width/4 = 2 frequencies
    y, x = 2, 3  # row 2, column 3 → token 2*5+3
    expected = torch.cat(
        [torch.sin(x * omega), torch.cos(x * omega), torch.sin(y * omega), torch.cos(y * omega)]
    )
    torch.testing.assert_close(pe[13], expected.float())


def test_attention_maps_on_request_and_fast_path_agree():
    model = small().eval()
    images = torch.randn(2, 3, 32, 32)
    slow = model.forward_features(images, return_attention=True)
    fast = model.forward_features(images)
    assert "attention" not in fast
    assert len(slow["attention"]) == 2
    assert slow["attention"][0].shape == (2, 4, 17, 17)
    torch.testing.assert_close(slow["attention"][1].sum(-1), torch.ones(2, 4, 17))
    torch.testing.assert_close(slow["tokens"], fast["tokens"], atol=1e-5, rtol=1e-5)


def test_dropout_sits_after_dense_layers_and_posemb_but_not_qkv():
    model = small(dropout=0.1)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Dropout)]
    # per block: after the attention output projection, after the MLP's GELU-dense and after its last dense
    assert names == ["pos_drop"] + [
        f"blocks.{i}.{n}" for i in range(2) for n in ("attn.proj_drop", "mlp.2", "mlp.4")
    ]
    assert all(m.p == 0.1 for m in model.modules() if isinstance(m, nn.Dropout))
    images = torch.randn(4, 3, 32, 32)
    model.train()
    assert not torch.allclose(
        model.forward_features(images)["tokens"], model.forward_features(images)["tokens"]
    )
    model.eval()
    torch.testing.assert_close(
        model.forward_features(images)["tokens"], model.forward_features(images)["tokens"]
    )


def test_vit_jax_initialisation():
    torch.manual_seed(0)
    model = VisionTransformer(ViTConfig.from_variant("S/16", image_size=64, num_classes=10, depth=2))
    assert model.head.weight.abs().max() == 0 and model.head.bias.abs().max() == 0
    assert model.cls_token.abs().max() == 0
    assert abs(model.pos_embed.std().item() - 0.02) < 0.002
    fc1 = model.blocks[0].mlp[0]
    assert fc1.bias.abs().max() < 1e-5 and fc1.bias.abs().max() > 0  # N(0, 1e-6)
    assert model.blocks[0].attn.qkv.bias.abs().max() == 0
    bound = math.sqrt(6 / (384 + 1536))  # xavier uniform
    assert fc1.weight.abs().max() <= bound and fc1.weight.abs().max() > 0.95 * bound
    qkv_bound = math.sqrt(6 / (384 + 384))  # xavier per q, k, v
    assert model.blocks[0].attn.qkv.weight.abs().max() <= qkv_bound
    conv = model.patch_embed.proj.weight
    assert abs(conv.std().item() - math.sqrt(1 / (3 * 16 * 16))) < 0.1 * math.sqrt(1 / (3 * 16 * 16))
    sigmoid = VisionTransformer(
        ViTConfig.from_variant("Ti/16", image_size=32, num_classes=4, head_bias_init=-10.0)
    )
    assert torch.all(sigmoid.head.bias == -10.0)


def test_layernorm_eps_and_pre_ln_blocks():
    model = small()
    assert all(m.eps == 1e-6 for m in model.modules() if isinstance(m, nn.LayerNorm))
    block = model.blocks[0].eval()
    x = torch.randn(2, 5, 32)
    y, _ = block.attn(block.norm1(x))
    h = x + y
    torch.testing.assert_close(block(x)[0], h + block.mlp(block.norm2(h)))


def test_hybrid_r50_feeds_one_by_one_patches():
    config = ViTConfig.from_variant("Ti/8", image_size=(64, 96), num_classes=3, hybrid="R_tiny", depth=1)
    model = VisionTransformer(config).eval()
    assert model.patch_embed.stem.reduction == 8 and model.patch_embed.proj.kernel_size == (1, 1)
    out = model.forward_features(torch.randn(2, 3, 64, 96))
    assert out["tokens"].shape == (2, 1 + 8 * 12, 192)
    coarser = VisionTransformer(config.replace(patch_size=16))  # 2x2 patches on the stride-8 feature map
    assert coarser.patch_embed.proj.kernel_size == (2, 2)
    with torch.device("meta"):
        r50 = VisionTransformer(ViTConfig.from_variant("B/16", image_size=224, hybrid="R50"))
    assert r50.patch_embed.stem.out_channels == 1024 and r50.patch_embed.proj.kernel_size == (1, 1)


def test_wrong_resolution_is_a_clear_error():
    with pytest.raises(ValueError, match="resize the position embedding"):
        small()(torch.randn(1, 3, 48, 48))


def test_bf16_autocast_forward_and_backward():
    model = small()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(torch.randn(2, 3, 32, 32))
    logits.float().sum().backward()
    assert model.patch_embed.proj.weight.grad is not None
