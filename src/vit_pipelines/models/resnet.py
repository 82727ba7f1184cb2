"""BiT ResNets: the hybrid ViT's stem (paper §3.1 "Hybrid Architecture", App. B) and the BiT classifier that the
paper compares ViT with (§4.1 "Baselines", Fig. 3-5).

The stem mirrors vit_jax (`models_resnet.py` and the root block in `models_vit.py`): bottleneck units with the
stride on the 3x3 conv (v1.5, no pre-activation), weight-standardised convs, GroupNorm(32) and JAX SAME
padding. Its stride-16 feature map feeds a ViT with patch size 1.

The classifier is BiT's ResNet-v2 (big_vision `models/bit.py`): pre-activation bottleneck units (GN, ReLU before
each weight-standardised conv), a final GN + ReLU, global average pooling and a zero-initialised linear head.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from vit_pipelines.models.config import BIT_DEPTHS, BiTConfig

# Stage depths per name. R50 is the paper's hybrid: ResNet-50 with stage 4 removed and its blocks
# moved into stage 3, so the output has stride 16. R50_s32 is the unmodified 4-stage R50 (stride 32).
RESNET_LAYERS: dict[str, tuple[int, ...]] = {
    "R_tiny": (1, 1),
    "R26": (2, 2, 2, 2),
    "R50": (3, 4, 9),
    "R50_s32": (3, 4, 6, 3),
}


def _same_pad(size: tuple[int, ...], kernel: tuple[int, ...], stride: tuple[int, ...]) -> list[int]:
    """JAX/TF 'SAME' padding as F.pad amounts (w_lo, w_hi, h_lo, h_hi); the extra pixel goes last."""
    pads: list[int] = []
    for n, k, s in zip(reversed(size), reversed(kernel), reversed(stride), strict=True):
        total = max((-(-n // s) - 1) * s + k - n, 0)
        pads += [total // 2, total - total // 2]
    return pads


def _max_pool_same(x: torch.Tensor) -> torch.Tensor:
    """3x3 stride-2 max-pool with SAME padding, as vit_jax's `nn.max_pool(..., padding='SAME')`."""
    x = F.pad(x, _same_pad(x.shape[-2:], (3, 3), (2, 2)), value=float("-inf"))
    return F.max_pool2d(x, kernel_size=3, stride=2)


def _group_norm(channels: int) -> nn.GroupNorm:
    # flax nn.GroupNorm defaults; narrower-than-BiT test models keep as many groups as divide the channels
    return nn.GroupNorm(math.gcd(32, channels), channels, eps=1e-6)


class StdConv2d(nn.Conv2d):
    """Conv2d whose kernel is standardised per output channel before each use (Weight Standardisation).

    `padding="same"` reproduces JAX SAME padding, which is asymmetric for strided convs; an int pads
    symmetrically as in nn.Conv2d.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int | str = "same",
        bias: bool = False,
        eps: float = 1e-5,
    ) -> None:
        same = padding == "same"
        super().__init__(in_channels, out_channels, kernel_size, stride, 0 if same else padding, bias=bias)
        self.same = same
        self.eps = eps

    def reset_parameters(self) -> None:
        # flax's default conv init: lecun_normal, a normal truncated at 2 std rescaled to keep variance 1/fan_in
        std = (self.weight[0].numel() ** -0.5) / 0.87962566103423978
        nn.init.trunc_normal_(self.weight, std=std, a=-2 * std, b=2 * std)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def standardized_weight(self) -> torch.Tensor:
        # vit_jax: (w - mean) / (std + 1e-5); timm's StdConv2dSame uses (w - mean) / sqrt(var + 1e-8)
        var, mean = torch.var_mean(self.weight, dim=(1, 2, 3), keepdim=True, correction=0)
        return (self.weight - mean) / (var.sqrt() + self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, padding = self.standardized_weight(), self.padding
        if self.same:
            w_lo, w_hi, h_lo, h_hi = _same_pad(x.shape[-2:], self.kernel_size, self.stride)
            if (w_lo, h_lo) == (w_hi, h_hi):  # symmetric: let the conv pad, saving a copy
                padding = (h_lo, w_lo)
            else:
                x, padding = F.pad(x, (w_lo, w_hi, h_lo, h_hi)), 0
        # on a 1x1 map the stride changes nothing, and oneDNN's bf16 weight gradient of a strided one is NaN
        stride = 1 if x.shape[-2:] == (1, 1) and not self.same else self.stride
        return F.conv2d(x, weight, self.bias, stride, padding, self.dilation, self.groups)


class ResidualUnit(nn.Module):
    """Bottleneck unit: 1x1 -> 3x3 (strided) -> 1x1 (4x wider), projection shortcut when the shape changes."""

    def __init__(self, in_channels: int, features: int, stride: int = 1) -> None:
        super().__init__()
        out_channels = features * 4
        self.conv1 = StdConv2d(in_channels, features, 1)
        self.gn1 = _group_norm(features)
        self.conv2 = StdConv2d(features, features, 3, stride)
        self.gn2 = _group_norm(features)
        self.conv3 = StdConv2d(features, out_channels, 1)
        self.gn3 = _group_norm(out_channels)
        nn.init.zeros_(self.gn3.weight)  # vit_jax zero-inits gn3's scale: each unit starts as the identity
        self.conv_proj: StdConv2d | None = None
        if in_channels != out_channels or stride != 1:
            self.conv_proj = StdConv2d(in_channels, out_channels, 1, stride)
            self.gn_proj = _group_norm(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.conv_proj is None else self.gn_proj(self.conv_proj(x))
        y = F.relu(self.gn1(self.conv1(x)))
        y = F.relu(self.gn2(self.conv2(y)))
        y = self.gn3(self.conv3(y))
        return F.relu(residual + y)


class ResNetStem(nn.Module):
    """ResNet root (7x7/2 conv, GN, ReLU, 3x3/2 max-pool) and bottleneck stages; the hybrid ViT's stem.

    Stage i (1-based) has `layers[i-1]` units of bottleneck width `width * 2**(i-1)`; its first unit has
    stride 1 in stage 1 and 2 after. Parameter names copy vit_jax's Flax scopes, so a checkpoint maps by
    replacing "/" with ".", "kernel" with "weight" (HWIO -> OIHW transpose) and "scale" with "weight":
        conv_root/kernel           -> conv_root.weight
        gn_root/{scale,bias}       -> gn_root.{weight,bias}
        block{i}/unit{j}/{conv1,conv2,conv3,conv_proj}/kernel -> block{i}.unit{j}.<same>.weight
        block{i}/unit{j}/{gn1,gn2,gn3,gn_proj}/{scale,bias}   -> block{i}.unit{j}.<same>.{weight,bias}
    """

    def __init__(self, layers: tuple[int, ...] = (3, 4, 9), width: int = 64, in_chans: int = 3) -> None:
        super().__init__()
        self.num_stages = len(layers)
        self.conv_root = StdConv2d(in_chans, width, 7, stride=2)
        self.gn_root = _group_norm(width)
        channels = width
        for i, depth in enumerate(layers):
            features = width * 2**i
            units = OrderedDict()
            for j in range(depth):
                units[f"unit{j + 1}"] = ResidualUnit(channels, features, stride=2 if i > 0 and j == 0 else 1)
                channels = features * 4
            self.add_module(f"block{i + 1}", nn.Sequential(units))
        self.out_channels: int = channels
        self.reduction: int = 4 * 2 ** max(len(layers) - 1, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _max_pool_same(F.relu(self.gn_root(self.conv_root(x))))
        for i in range(self.num_stages):
            x = getattr(self, f"block{i + 1}")(x)
        return x


def resnet_stem_from_name(name: str, width: int = 64) -> ResNetStem:
    """Build a stem from a name in RESNET_LAYERS (e.g. "R50" for the paper's R50+ViT-B/16 hybrid)."""
    if name not in RESNET_LAYERS:
        raise ValueError(f"unknown ResNet stem {name!r}; valid names: {sorted(RESNET_LAYERS)}")
    return ResNetStem(RESNET_LAYERS[name], width=width)


class PreActUnit(nn.Module):
    """ResNet-v2 bottleneck: GN, ReLU, then 1x1 → 3x3 (strided) → 1x1 (4x wider), each after GN and ReLU; the
    shortcut is projected from the pre-activated input where the shape changes."""

    def __init__(self, in_channels: int, features: int, stride: int = 1) -> None:
        super().__init__()
        out_channels = features * 4
        self.gn1 = _group_norm(in_channels)
        self.conv_proj: StdConv2d | None = None
        if in_channels != out_channels or stride != 1:
            self.conv_proj = StdConv2d(in_channels, out_channels, 1, stride)
        self.conv1 = StdConv2d(in_channels, features, 1)
        self.gn2 = _group_norm(features)
        self.conv2 = StdConv2d(features, features, 3, stride, padding=1)
        self.gn3 = _group_norm(features)
        self.conv3 = StdConv2d(features, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.gn1(x))
        residual = x if self.conv_proj is None else self.conv_proj(y)
        y = self.conv1(y)
        y = self.conv2(F.relu(self.gn2(y)))
        y = self.conv3(F.relu(self.gn3(y)))
        return y + residual


class BiTResNet(nn.Module):
    """`model(images)` → logits `[B, K]` for float images `[B, 3, H, W]` in [-1, 1]: BiT's ResNet-v2.

    The same interface as `VisionTransformer` where the training loop and the evaluations use it:
    `forward_features(images)["pre_logits"]` is the pooled representation, `head` the linear classifier."""

    def __init__(self, config: BiTConfig) -> None:
        super().__init__()
        self.config = config
        width = config.width
        self.conv_root = StdConv2d(config.in_chans, width, 7, stride=2, padding=3)
        channels, stages = width, []
        for i, depth in enumerate(BIT_DEPTHS[config.depth]):
            features = width * 2**i
            units = OrderedDict()
            for j in range(depth):
                units[f"unit{j + 1}"] = PreActUnit(channels, features, stride=2 if i > 0 and j == 0 else 1)
                channels = features * 4
            stages.append(nn.Sequential(units))
        self.stages = nn.ModuleList(stages)
        self.norm = _group_norm(channels)
        self.head = nn.Linear(channels, config.num_classes)
        self.activation_checkpointing = False  # set by training: units recompute activations in backward
        nn.init.zeros_(self.head.weight)  # BiT: a zero head, so every class starts equal
        nn.init.constant_(self.head.bias, config.head_bias_init)

    @classmethod
    def from_seed(cls, config: BiTConfig, seed: int) -> BiTResNet:
        """A freshly initialised model whose weights depend on `seed` alone; the global RNG is left as it was."""
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return cls(config)

    def forward_features(self, images: torch.Tensor, tokens: bool = False) -> dict[str, object]:
        """`pre_logits` `[B, C]`: the final feature map after GN and ReLU, averaged over space; `grid` its size.
        `tokens=True` adds that map as `[B, rows * columns, C]`."""
        x = F.max_pool2d(self.conv_root(images), kernel_size=3, stride=2, padding=1)
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for stage in self.stages:
            for unit in stage:
                x = checkpoint(unit, x, use_reentrant=False) if recompute else unit(x)
        x = F.relu(self.norm(x))
        out: dict[str, object] = {"pre_logits": x.mean(dim=(2, 3)), "grid": tuple(x.shape[-2:])}
        if tokens:
            out["tokens"] = x.flatten(2).transpose(1, 2)
        return out

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(images)["pre_logits"])
