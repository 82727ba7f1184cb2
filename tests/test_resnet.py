import pytest
import torch
import torch.nn.functional as F

from vit_pipelines.models.resnet import ResNetStem, StdConv2d, resnet_stem_from_name


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
