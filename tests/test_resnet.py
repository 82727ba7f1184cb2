import json

import pytest
import torch
import torch.nn.functional as F

from vit_pipelines.models.config import BiTConfig
from vit_pipelines.models.resnet import BiTResNet, ResNetStem, StdConv2d, resnet_stem_from_name
from vit_pipelines.models.surgery import for_finetuning


@pytest.fixture(scope="module")
def r50() -> ResNetStem:
    torch.manual_seed(0)
    return resnet_stem_from_name("R50").eval()


@pytest.mark.parametrize(("hw", "grid"), [((224, 224), (14, 14)), ((64, 96), (4, 6)), ((33, 47), (3, 3))])
def test_r50_output_shape(r50: ResNetStem, hw: tuple[int, int], grid: tuple[int, int]) -> None:
    assert (r50.out_channels, r50.reduction) == (1024, 16)
    with torch.no_grad():
        out = r50(torch.randn(2, 3, *hw))
    assert out.shape == (2, 1024, *grid)  # ceil(H / 16), ceil(W / 16)


def test_r50_parameter_count(r50: ResNetStem) -> None:
    # By hand: root conv 7*7*3*64 + GN 2*64 = 9,536; stages (3, 4, 9) = 215,808 + 1,219,584 + 10,449,920.
    n_stem = sum(p.numel() for p in r50.parameters())
    assert n_stem == 11_894_848
    # Cross-check with timm's model card for vit_base_r50_s16_224.orig_in21k (no head): "Params (M): 97.9".
    # Hybrid = stem + ViT-B/16 without head (85,798,656) - 16x16 patch embedding (590,592) + 1x1 one (787,200).
    assert round((n_stem + 85_798_656 - 590_592 + 787_200) / 1e6, 1) == 97.9


def test_names_follow_vit_jax(r50: ResNetStem) -> None:
    keys = r50.state_dict().keys()
    for key in [
        "conv_root.weight",
        "gn_root.bias",
        "block1.unit1.conv_proj.weight",
        "block3.unit9.gn3.weight",
    ]:
        assert key in keys
    assert "block1.unit2.conv_proj.weight" not in keys  # shortcut projection only where the shape changes
    assert not any(name.endswith("conv1.bias") for name in keys)
    assert torch.all(r50.block2.unit1.gn3.weight == 0)  # vit_jax zero-inits gn3's scale


def test_std_conv_standardises_kernel() -> None:
    torch.manual_seed(0)
    conv = StdConv2d(8, 16, 3, padding=1)
    with torch.no_grad():
        conv.weight.mul_(5.0).add_(2.0)  # any scale / offset must be standardised away
        w = conv.standardized_weight()
        var, mean = torch.var_mean(w, dim=(1, 2, 3), correction=0)
        assert torch.allclose(mean, torch.zeros(16), atol=1e-5)
        assert torch.allclose(var, torch.ones(16), atol=1e-4)
        x = torch.randn(2, 8, 10, 12)
        torch.testing.assert_close(conv(x), F.conv2d(x, w, padding=1))


@pytest.mark.parametrize("size", [7, 8, 15, 16, 224])
@pytest.mark.parametrize(("kernel", "stride"), [(7, 2), (3, 2), (3, 1), (1, 2)])
def test_same_padding_output_size(size: int, kernel: int, stride: int) -> None:
    conv = StdConv2d(3, 4, kernel, stride)
    out = conv(torch.randn(1, 3, size, size + 1))
    assert out.shape[-2:] == (-(-size // stride), -(-(size + 1) // stride))


def test_same_padding_is_asymmetric_like_jax() -> None:
    # JAX SAME for k=3, s=2 on 8 pixels pads 0 before and 1 after (PyTorch's padding=1 would pad 1 and 1).
    torch.manual_seed(0)
    conv = StdConv2d(2, 3, 3, 2)
    x = torch.randn(1, 2, 8, 8)
    with torch.no_grad():
        expected = F.conv2d(F.pad(x, (0, 1, 0, 1)), conv.standardized_weight(), stride=2)
        torch.testing.assert_close(conv(x), expected)


def test_backward_and_bf16_autocast() -> None:
    torch.manual_seed(0)
    model = resnet_stem_from_name("R_tiny", width=32)
    assert (model.out_channels, model.reduction) == (256, 8)
    x = torch.randn(3, 3, 40, 56, requires_grad=True)
    model(x).square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(1, 3, 40, 56))
    assert out.shape == (1, 256, 5, 7) and torch.isfinite(out).all()


def test_unknown_name_lists_valid_ones() -> None:
    with pytest.raises(ValueError, match="R50"):
        resnet_stem_from_name("R101")


# BiT ResNet-v2 classifier (paper §4.1 "Baselines"): the published parameter counts of BiT's ImageNet-1k models
# (timm's model cards for resnetv2_{50x1,50x3,101x1,152x2}_bit: 25.55M, 217.32M, 44.54M, 236.34M).
@pytest.mark.parametrize(
    ("variant", "millions"), [("R50x1", 25.55), ("R50x3", 217.32), ("R101x1", 44.54), ("R152x2", 236.34)]
)
def test_bit_parameter_counts_match_the_published_ones(variant: str, millions: float) -> None:
    with torch.device("meta"):
        model = BiTResNet(BiTConfig.from_variant(variant, num_classes=1000))
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == millions


def test_bit_depth_26_has_two_units_per_stage_and_a_width_factor_scales_every_stage() -> None:
    config = BiTConfig.from_variant("R26x0.5", image_size=32, num_classes=10)
    assert (config.depth, config.width, config.num_features) == (26, 32, 1024)
    model = BiTResNet(config)
    assert [len(stage) for stage in model.stages] == [2, 2, 2, 2]
    keys = model.state_dict().keys()
    # pre-activation units: the shortcut is projected where the shape changes, and no norm follows the root
    assert "stages.0.unit1.conv_proj.weight" in keys and "stages.0.unit2.conv_proj.weight" not in keys
    assert "stages.0.unit1.gn1.weight" in keys and not any(k.startswith("gn_root") for k in keys)
    assert model.stages[1][0].conv2.stride == (2, 2) and model.stages[0][0].conv2.stride == (1, 1)


def test_bit_classifier_starts_with_equal_logits_and_exposes_its_representation() -> None:
    model = BiTResNet.from_seed(
        BiTConfig.from_variant("R26x0.5", image_size=32, num_classes=7), seed=0
    ).eval()
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        features = model.forward_features(images, tokens=True)
        logits = model(images)
    assert features["pre_logits"].shape == (3, 1024) and (features["pre_logits"] >= 0).all()  # after ReLU
    assert features["grid"] == (1, 1) and features["tokens"].shape == (3, 1, 1024)  # 32 px / 32
    assert torch.equal(logits, torch.zeros(3, 7))  # BiT's zero head
    again = BiTResNet.from_seed(model.config, seed=0)
    pairs = zip(model.state_dict().values(), again.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)


def test_a_strided_conv_on_a_1x1_map_has_finite_bf16_gradients_and_the_same_output() -> None:
    torch.manual_seed(0)
    conv = StdConv2d(8, 8, 3, stride=2, padding=1)
    x = torch.randn(4, 8, 1, 1, requires_grad=True)
    expected = F.conv2d(x, conv.standardized_weight(), None, 2, 1)
    torch.testing.assert_close(conv(x), expected)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        conv(x).float().square().sum().backward()
    assert torch.isfinite(conv.weight.grad).all() and conv.weight.grad.abs().sum() > 0


def test_bit_trains_in_bf16_at_16_px_and_activation_checkpointing_keeps_the_gradients() -> None:
    model = BiTResNet.from_seed(BiTConfig.from_variant("R26x0.25", image_size=16, num_classes=4), seed=0)
    torch.nn.init.normal_(model.head.weight, std=0.1)  # a zero head sends no gradient to the body
    images, labels = torch.rand(8, 3, 16, 16) * 2 - 1, torch.arange(8) % 4
    grads = []
    for recompute in (False, True):
        model.activation_checkpointing = recompute
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            F.cross_entropy(model(images), labels).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.isfinite(g).all() for g in grads[0])
    for plain, recomputed in zip(*grads, strict=True):
        torch.testing.assert_close(plain, recomputed)


def test_bit_fine_tuning_keeps_the_body_and_puts_a_zero_head_of_the_new_size() -> None:
    pretrained = BiTResNet.from_seed(
        BiTConfig.from_variant("R26x0.25", image_size=16, num_classes=40), seed=1
    )
    torch.nn.init.normal_(pretrained.head.weight)
    tuned = for_finetuning(pretrained, 24, num_classes=5)
    assert tuned.config.image_size == (24, 24) and tuned.head.out_features == 5
    assert not tuned.head.weight.any() and not tuned.head.bias.any()
    body = {k: v for k, v in pretrained.state_dict().items() if not k.startswith("head.")}
    assert all(torch.equal(v, tuned.state_dict()[k]) for k, v in body.items())
    assert pretrained.head.out_features == 40  # the source model is untouched


def test_bit_variant_names_and_fields_are_checked_in_one_line() -> None:
    with pytest.raises(ValueError, match="BiT variant must look like 'R50x1'"):
        BiTConfig.from_variant("R34x1")
    with pytest.raises(ValueError, match=r"unknown BiT model parameters of R26x1 \['posemb'\]"):
        BiTConfig.from_variant("R26x1", posemb="none")
    config = BiTConfig.from_variant("R50x2", image_size=(32, 48), num_classes=3)
    assert BiTConfig.from_dict(json.loads(config.to_json())) == config
