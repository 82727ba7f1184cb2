"""Checkpoints: posemb resizing (scipy zoom), and loading HF / timm / vit_jax+big_vision / native weights with
the source's logits, head replacement and HF export. Source weights are built here by each format's documented
names and shapes: nothing is downloaded."""

import pickle
import re

import numpy as np
import pytest
import scipy.ndimage
import torch
from torch import nn

from vit_pipelines.models import VisionTransformer, ViTConfig, export_hf, load_pretrained, resize_pos_embed
from vit_pipelines.training.saving import save_model

ATOL = 1e-4  # against another framework's model
SAME = 1e-6  # the same tensors through this model


def randomized(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every parameter perturbed (zero heads, unit norms): a comparison that cannot pass by an init's symmetry."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.1)
    return model.eval()


def small(**overrides) -> VisionTransformer:
    fields = dict(depth=2, width=64, mlp_dim=128, num_heads=4, image_size=32)
    fields.update(overrides)
    image_size = fields.pop("image_size")
    return randomized(
        VisionTransformer(ViTConfig.from_variant("Ti/8", image_size=image_size, num_classes=5, **fields))
    )


def images(size: int | tuple[int, int] = 32) -> torch.Tensor:
    h, w = (size, size) if isinstance(size, int) else size
    return torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(1))


def assert_same_logits(
    ours: VisionTransformer, reference: nn.Module, x: torch.Tensor, atol: float = SAME
) -> None:
    with torch.no_grad():
        expected = reference(x)
        expected = getattr(expected, "logits", expected)
        torch.testing.assert_close(ours(x), expected, atol=atol, rtol=0)


# --- resize_pos_embed -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("old", "new"),
    [((7, 7), (12, 12)), ((5, 9), (8, 3)), ((24, 24), (16, 16)), ((1, 4), (3, 1)), ((3, 2), (1, 1))],
)
@pytest.mark.parametrize("prefix", [0, 1, 2])
def test_zoom_bilinear_equals_scipy_zoom(old, new, prefix):
    posemb = np.random.default_rng(0).standard_normal((1, prefix + old[0] * old[1], 8)).astype(np.float32)
    out = resize_pos_embed(torch.from_numpy(posemb), new, prefix, old_grid=old)
    grid = posemb[0, prefix:].reshape(*old, 8)
    expected = scipy.ndimage.zoom(grid, (new[0] / old[0], new[1] / old[1], 1), order=1)
    assert out.shape == (1, prefix + new[0] * new[1], 8) and out.dtype == torch.float32
    assert torch.equal(out[:, :prefix], torch.from_numpy(posemb[:, :prefix]))
    np.testing.assert_allclose(out[0, prefix:].reshape(*new, 8).numpy(), expected, atol=1e-5, rtol=0)


def test_square_grid_is_inferred_and_same_size_is_identity():
    posemb = torch.randn(1, 1 + 49, 16)
    assert torch.equal(resize_pos_embed(posemb, 12), resize_pos_embed(posemb, (12, 12), old_grid=(7, 7)))
    torch.testing.assert_close(resize_pos_embed(posemb, (7, 7)), posemb, atol=1e-6, rtol=0)


def test_bicubic_keeps_prefix_and_constants():
    posemb = torch.cat([torch.randn(1, 1, 8), torch.full((1, 24 * 24, 8), 0.5)], dim=1)
    out = resize_pos_embed(posemb, (16, 20), method="bicubic")
    assert out.shape == (1, 1 + 16 * 20, 8)
    assert torch.equal(out[:, :1], posemb[:, :1])
    torch.testing.assert_close(out[:, 1:], torch.full((1, 320, 8), 0.5), atol=1e-6, rtol=0)
    varied = torch.randn(1, 1 + 36, 8)
    torch.testing.assert_close(resize_pos_embed(varied, 6, method="bicubic"), varied, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("posemb", "kwargs", "message"),
    [
        (torch.randn(1, 1 + 12, 4), {}, "square"),
        (torch.randn(1, 1 + 12, 4), {"old_grid": (3, 5)}, "old_grid"),
        (torch.randn(1, 17, 4), {"method": "nearest"}, "method"),
        (torch.randn(17, 4), {}, r"\[1, prefix"),
        (torch.randn(1, 2, 4), {"num_prefix_tokens": 2}, "no grid"),
        (torch.randn(1, 17, 4), {"new_grid": (0, 3)}, "positive"),
    ],
)
def test_resize_pos_embed_errors(posemb, kwargs, message):
    kwargs.setdefault("new_grid", (5, 5))
    with pytest.raises(ValueError, match=message):
        resize_pos_embed(posemb, **kwargs)


# --- Hugging Face transformers -----------------------------------------------------------------------------------


def hf_config(**overrides):
    import transformers  # the test extra installs it: the logits-parity tests never skip

    fields = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
    fields.update(image_size=32, patch_size=8, num_labels=5)
    fields.update(overrides)
    return transformers.ViTConfig(**fields)


def test_hf_classifier_gives_hf_logits_from_memory_and_from_its_folder(tmp_path):
    from transformers import ViTForImageClassification

    # HF's default layer_norm_eps 1e-12 stays: this model's 1e-6 is far below the tolerance.
    hf = randomized(ViTForImageClassification(hf_config(image_size=[32, 48])))
    ours = load_pretrained(hf.state_dict(), format="hf", hf_config=hf.config)
    assert ours.config.image_size == (32, 48) and not ours.training
    assert_same_logits(ours, hf, images((32, 48)), atol=ATOL)

    hf.save_pretrained(tmp_path)  # the on-disk names differ from the modules' names in transformers 5
    assert_same_logits(load_pretrained(tmp_path), hf, images((32, 48)), atol=ATOL)


def test_hf_backbone_without_head_takes_a_zero_head(tmp_path):
    from transformers import ViTModel

    hf = randomized(ViTModel(hf_config()))
    with pytest.raises(ValueError, match="num_classes"):
        load_pretrained(hf.state_dict(), format="hf", hf_config=hf.config.to_dict())
    ours = load_pretrained(hf.state_dict(), format="hf", hf_config=hf.config.to_dict(), num_classes=3)
    assert ours.config.representation_size is None and isinstance(ours.pre_logits, nn.Identity)
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(
            ours.forward_features(x)["tokens"], hf(x).last_hidden_state, atol=ATOL, rtol=0
        )
        assert torch.equal(ours(x), torch.zeros(2, 3))


def test_a_backbone_without_head_serves_features_alone():
    """Few-shot probes need features only: a headless checkpoint loads with an empty head, no num_classes."""
    from transformers import ViTModel

    from vit_pipelines.data import embedded
    from vit_pipelines.data.cache import cache_images
    from vit_pipelines.evaluation.features import extract_features

    hf = randomized(ViTModel(hf_config()))
    ours = load_pretrained(hf.state_dict(), format="hf", hf_config=hf.config.to_dict(), features_only=True)
    assert ours.config.num_classes == 0
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(
            ours.forward_features(x)["tokens"], hf(x).last_hidden_state, atol=ATOL, rtol=0
        )
    digits = embedded.build_downstream("digits", image_size=32)["test"].select(range(3))
    features, _ = extract_features(ours, cache_images(digits, "decode")[0], "value_range(-1,1)")
    assert features.shape == (3, hf.config.hidden_size) and np.isfinite(features).all()


def test_hf_at_a_higher_resolution():
    from transformers import ViTForImageClassification

    hf = randomized(ViTForImageClassification(hf_config()))
    ours = load_pretrained(hf.state_dict(), format="hf", hf_config=hf.config, image_size=48)
    posemb = hf.vit.embeddings.position_embeddings.detach()
    assert torch.equal(ours.pos_embed.detach(), resize_pos_embed(posemb, (6, 6)))
    with torch.no_grad():  # HF interpolates bicubically on the fly: only the shapes are comparable
        assert ours(images(48)).shape == hf(images(48), interpolate_pos_encoding=True).logits.shape == (2, 5)


def test_export_hf_round_trip(tmp_path):
    from transformers import ViTForImageClassification

    ours = small(image_size=(32, 48))
    export_hf(ours, tmp_path)
    hf = ViTForImageClassification.from_pretrained(tmp_path).eval()
    assert_same_logits(ours, hf, images((32, 48)), atol=ATOL)
    assert_same_logits(load_pretrained(tmp_path), ours, images((32, 48)))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"pool": "gap"}, "gap"),
        ({"posemb": "sincos2d"}, "sincos2d"),
        ({"representation_size": 16}, "pre-logits"),
    ],
)
def test_export_hf_refuses_what_hf_cannot_express(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        export_hf(small(**overrides), tmp_path)


# --- timm ------------------------------------------------------------------------------------------------------


def to_timm(model: VisionTransformer) -> dict[str, torch.Tensor]:
    """Our weights under timm's VisionTransformer names: patch_embed.proj, cls_token, pos_embed, blocks.i.{norm1,
    attn.qkv ([3D, D], q|k|v), attn.proj, norm2, mlp.fc1, mlp.fc2}, norm, head (and old timm's pre_logits.fc)."""
    renames = {".mlp.0.": ".mlp.fc1.", ".mlp.3.": ".mlp.fc2.", "pre_logits.0.": "pre_logits.fc."}
    state = {}
    for key, value in model.state_dict().items():
        for ours, timm in renames.items():
            key = key.replace(ours, timm)
        state[key] = value.clone()
    return state


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
@pytest.mark.parametrize("overrides", [{}, {"pool": "gap"}, {"representation_size": 48}])
def test_timm_state_dict_gives_identical_logits(tmp_path, suffix, overrides):
    from safetensors.torch import save_file

    source = small(**overrides)
    path = tmp_path / f"timm{suffix}"
    (save_file if suffix == ".safetensors" else torch.save)(to_timm(source), path)
    ours = load_pretrained(path, num_heads=4)
    assert ours.config == source.config.replace(variant=None)
    assert_same_logits(ours, source, images())


def test_timm_posemb_without_class_slot_and_table_1_heads():
    source = small(depth=1, width=192, mlp_dim=96, num_heads=3)
    with torch.no_grad():
        source.pos_embed[:, 0] = 0.0  # timm's no_embed_class: the class token gets no position
    state = to_timm(source)
    state["pos_embed"] = state["pos_embed"][:, 1:]
    ours = load_pretrained(state)
    assert ours.config.num_heads == 3
    assert_same_logits(ours, source, images())


def test_timm_errors():
    state = to_timm(small())
    with pytest.raises(ValueError, match="num_heads"):
        load_pretrained(state)
    with pytest.raises(ValueError, match="fc_norm"):
        load_pretrained(
            {**state, "fc_norm.weight": torch.ones(64), "fc_norm.bias": torch.zeros(64)}, num_heads=4
        )


# --- vit_jax / big_vision npz -----------------------------------------------------------------------------------


def to_npz(model: VisionTransformer, style: str = "vit_jax") -> dict[str, np.ndarray]:
    """Our weights as a vit_jax (pre-linen names, posemb with the class slot) or big_vision (linen names,
    patch-only posemb, scanned encoder, under params/) npz. Flax shapes: Dense kernels [in, out]; q/k/v kernels
    [D, heads, head_dim], out kernel [heads, head_dim, D]; conv kernels HWIO; GroupNorm scales [1, 1, 1, C]."""
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    d, heads = model.config.width, model.config.num_heads
    sub = ("MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3")
    if style == "big_vision":
        sub = ("MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0")
    mha, ln2, mlp = sub
    p = {
        "embedding/kernel": sd["patch_embed.proj.weight"].permute(2, 3, 1, 0),
        "embedding/bias": sd["patch_embed.proj.bias"],
        "Transformer/encoder_norm/scale": sd["norm.weight"],
        "Transformer/encoder_norm/bias": sd["norm.bias"],
        "head/kernel": sd["head.weight"].T,
        "head/bias": sd["head.bias"],
    }
    if "cls_token" in sd:
        p["cls"] = sd["cls_token"]
    if "pre_logits.0.weight" in sd:
        p["pre_logits/kernel"], p["pre_logits/bias"] = sd["pre_logits.0.weight"].T, sd["pre_logits.0.bias"]
    if style == "big_vision":
        p["pos_embedding"] = sd["pos_embed"][:, model.config.num_prefix_tokens :]
    else:
        p["Transformer/posembed_input/pos_embedding"] = sd["pos_embed"]
    for i in range(model.config.depth):
        b, s = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
        qkv_w, qkv_b = sd[s + "attn.qkv.weight"].chunk(3), sd[s + "attn.qkv.bias"].chunk(3)
        for name, w, bias in zip(("query", "key", "value"), qkv_w, qkv_b, strict=True):
            p[f"{b}{mha}/{name}/kernel"] = w.T.reshape(d, heads, d // heads)
            p[f"{b}{mha}/{name}/bias"] = bias.reshape(heads, d // heads)
        p[f"{b}{mha}/out/kernel"] = sd[s + "attn.proj.weight"].T.reshape(heads, d // heads, d)
        p[f"{b}{mha}/out/bias"] = sd[s + "attn.proj.bias"]
        for flax, ours in (("LayerNorm_0", "norm1"), (ln2, "norm2")):
            p[f"{b}{flax}/scale"], p[f"{b}{flax}/bias"] = sd[f"{s}{ours}.weight"], sd[f"{s}{ours}.bias"]
        for flax, ours in (("Dense_0", "mlp.0"), ("Dense_1", "mlp.3")):
            p[f"{b}{mlp}/{flax}/kernel"] = sd[f"{s}{ours}.weight"].T
            p[f"{b}{mlp}/{flax}/bias"] = sd[f"{s}{ours}.bias"]
    for key, value in sd.items():  # hybrid: conv_root, gn_root, block{i}/unit{j}/{conv,gn}*, as vit_jax
        if key.startswith("patch_embed.stem."):
            name = key.removeprefix("patch_embed.stem.").replace(".", "/")
            if value.ndim == 4:
                p[name.replace("/weight", "/kernel")] = value.permute(2, 3, 1, 0)
            else:
                p[name.replace("/weight", "/scale")] = value.reshape(1, 1, 1, -1)
    if style == "big_vision":
        blocks = [k for k in p if k.startswith("Transformer/encoderblock_0/")]
        for key in blocks:
            layers = [p.pop(key.replace("_0/", f"_{i}/", 1)) for i in range(model.config.depth)]
            p[key.replace("encoderblock_0/", "encoderblock/")] = torch.stack(layers)
        p = {f"params/{k}": v for k, v in p.items()}
    return {k: v.contiguous().numpy() for k, v in p.items()}


@pytest.mark.parametrize("overrides", [{}, {"pool": "gap"}, {"representation_size": 48}])
def test_vit_jax_npz_gives_identical_logits(tmp_path, overrides):
    source = small(**overrides)
    np.savez(tmp_path / "vit.npz", **to_npz(source))
    ours = load_pretrained(tmp_path / "vit.npz")
    assert ours.config.num_heads == 4 and ours.config.pool == source.config.pool
    assert_same_logits(ours, source, images())


def test_big_vision_scanned_tree_in_memory_gives_identical_logits():
    source = small()
    with torch.no_grad():
        source.pos_embed[:, 0] = 0.0  # big_vision adds the posemb before the class token joins
    assert_same_logits(load_pretrained(to_npz(source, "big_vision")), source, images())


def test_vit_jax_r50_style_hybrid_npz_gives_identical_logits(tmp_path):
    source = small(hybrid="R_tiny", depth=1)
    params = to_npz(source)
    vit_jax_names = {
        "conv_root/kernel",
        "gn_root/scale",
        "block2/unit1/conv_proj/kernel",
        "block2/unit1/gn3/bias",
    }
    assert vit_jax_names <= set(params)
    np.savez(tmp_path / "hybrid.npz", **params)
    ours = load_pretrained(tmp_path / "hybrid.npz")
    assert ours.config.hybrid == "R_tiny" and ours.config.patch_size == (8, 8)
    assert_same_logits(ours, source, images())


# --- reconciling: resolution and head ---------------------------------------------------------------------------


def test_native_same_size_is_identical_and_a_new_size_resizes_the_posemb(tmp_path):
    source = small(representation_size=48)
    save_model(source, tmp_path)
    same = load_pretrained(tmp_path, image_size=32)
    assert torch.equal(same.pos_embed, source.pos_embed) and same.config == source.config
    assert_same_logits(same, source, images())

    bigger = load_pretrained(tmp_path, image_size=(48, 64))
    assert torch.equal(
        bigger.pos_embed.detach(), resize_pos_embed(source.pos_embed.detach(), (6, 8), 1, (4, 4))
    )
    assert bigger(images((48, 64))).shape == (2, 5)
    bicubic = load_pretrained(tmp_path, image_size=48, resize_method="bicubic")
    assert torch.equal(
        bicubic.pos_embed.detach(), resize_pos_embed(source.pos_embed.detach(), 6, method="bicubic")
    )


@pytest.mark.parametrize("posemb", ["learn2d", "sincos2d"])
def test_2d_position_embeddings_follow_the_resolution(tmp_path, posemb):
    source = small(posemb=posemb, pool="gap")
    save_model(source, tmp_path)
    bigger = load_pretrained(tmp_path, image_size=(48, 24))
    expected = resize_pos_embed(source.position_embedding().detach(), (6, 3), 0, (4, 4))
    if posemb == "sincos2d":
        expected = VisionTransformer(source.config.replace(image_size=(48, 24))).position_embedding()
    torch.testing.assert_close(bigger.position_embedding().detach(), expected, atol=1e-6, rtol=0)


def test_new_class_count_puts_one_zero_head(tmp_path):
    source = small(representation_size=48)
    save_model(source, tmp_path)
    ours = load_pretrained(tmp_path, num_classes=3)
    assert ours.config.num_classes == 3 and ours.config.representation_size is None
    assert isinstance(ours.pre_logits, nn.Identity) and ours.head.in_features == 64
    assert not ours.head.weight.any() and not ours.head.bias.any()
    for name, value in ours.state_dict().items():
        if not name.startswith("head."):
            assert torch.equal(value, source.state_dict()[name]), name


# --- safety and detection ---------------------------------------------------------------------------------------

UNPICKLED = []


def _record_unpickling() -> int:
    UNPICKLED.append(True)
    return 0


class Payload:
    def __reduce__(self):
        return (_record_unpickling, ())


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickled_objects_are_refused(tmp_path):
    pickle.dump({"weight": Payload()}, (tmp_path / "plain.bin").open("wb"))
    torch.save({"weight": torch.zeros(1), "payload": Payload()}, tmp_path / "torch.pth")
    for name in ("plain.bin", "torch.pth"):
        with pytest.raises(ValueError, match="refusing to unpickle"):
            load_pretrained(tmp_path / name)
    np.savez(tmp_path / "objects.npz", weight=np.array([Payload()], dtype=object))
    with pytest.raises(ValueError, match="allow_pickle"):
        load_pretrained(tmp_path / "objects.npz")
    assert not UNPICKLED


def test_unknown_formats_and_misfits_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="format"):
        load_pretrained(small().state_dict())  # this project's keys without config.json
    with pytest.raises(ValueError, match="format must be"):
        load_pretrained(small().state_dict(), format="onnx")
    params = to_npz(small())
    del params["Transformer/encoderblock_1/LayerNorm_2/bias"]
    with pytest.raises(ValueError, match="does not fit"):
        load_pretrained(params)
    with pytest.raises(FileNotFoundError):
        load_pretrained(tmp_path)


def test_an_earlier_releases_unversioned_results_become_versions_that_load(tmp_path):
    """Outputs saved before `versioned: true` (a file at the dataset's path, a model folder with its weights at
    the top) are moved into a version, which versioned loading then reads; checkpoints beside them stay."""
    from kedro.io import Version
    from kedro_datasets.json import JSONDataset

    from vit_pipelines.kedro_io import ViTModelDataset, version_earlier_result

    metrics_path = tmp_path / "pretrain_metrics.json"
    metrics_path.write_text('{"minival_accuracy": 0.38}')
    metrics = JSONDataset(filepath=str(metrics_path), version=Version(None, None))
    moved = version_earlier_result(metrics)
    assert moved.parent == metrics_path and metrics.load() == {"minival_accuracy": 0.38}
    model = randomized(small())
    save_model(model, tmp_path / "pretrain")
    (tmp_path / "pretrain" / "checkpoints").mkdir()
    dataset = ViTModelDataset(str(tmp_path / "pretrain"), version=Version(None, None))
    version = version_earlier_result(dataset)
    assert {p.name for p in (tmp_path / "pretrain").iterdir()} == {"checkpoints", version.name}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d\.\d\d\.\d\d\.\d{3}Z", version.name)  # Kedro's version format
    for name, value in dataset.load().state_dict().items():
        torch.testing.assert_close(value, model.state_dict()[name], rtol=0, atol=0, msg=name)
    assert version_earlier_result(dataset) is None and version_earlier_result(metrics) is None  # once only
