"""`ViTConfig`: the hyper-parameters of a Vision Transformer, named as in the paper's Table 1; `BiTConfig`: those of
the BiT ResNet baseline it is compared with (§4.1 "Baselines")."""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from typing import Any

from vit_pipelines.fields import check_known_fields

# Table 1 of the paper: (layers, hidden size D, MLP size, heads); g and G from "Scaling Vision Transformers"
# (Zhai et al. 2022, Table 2), the sizes `train.sharding: fsdp` is for.
VARIANTS: dict[str, tuple[int, int, int, int]] = {
    "Ti": (12, 192, 768, 3),
    "S": (12, 384, 1536, 6),
    "B": (12, 768, 3072, 12),
    "L": (24, 1024, 4096, 16),
    "H": (32, 1280, 5120, 16),
    "g": (40, 1408, 6144, 16),
    "G": (48, 1664, 8192, 16),
}
POOLS = ("tok", "gap")
POSEMBS = ("learn", "sincos2d", "learn2d", "none")


def _fields_as_json(config: Any) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}


def _pair(value: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    h, w = value
    return (int(h), int(w))


class _ModelConfig:
    """What both model configs do: a changed copy, and JSON (through each one's `to_dict`)."""

    def replace(self, **changes: Any) -> Any:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


@dataclass(frozen=True)
class ViTConfig(_ModelConfig):
    """Everything needed to build a `VisionTransformer`; JSON round-trips through `to_dict`/`from_dict`.

    `image_size` and `patch_size` are (height, width) in pixels. With `hybrid="R50"` the patch size is the
    effective one on the image (16 = the ResNet's stride 16 x 1x1 patches on its feature map).
    """

    image_size: tuple[int, int] = (224, 224)
    patch_size: tuple[int, int] = (16, 16)
    width: int = 768
    depth: int = 12
    mlp_dim: int = 3072
    num_heads: int = 12
    num_classes: int = 1000
    pool: str = "tok"
    representation_size: int | None = None
    posemb: str = "learn"
    dropout: float = 0.0
    attention_dropout: float = 0.0
    hybrid: str | None = None
    in_chans: int = 3
    head_bias_init: float = 0.0
    variant: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_size", _pair(self.image_size))
        object.__setattr__(self, "patch_size", _pair(self.patch_size))
        if self.pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {self.pool!r}")
        if self.posemb not in POSEMBS:
            raise ValueError(f"posemb must be one of {POSEMBS}, got {self.posemb!r}")
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}")
        if self.posemb == "sincos2d" and self.width % 4:
            raise ValueError(f"posemb 'sincos2d' needs width divisible by 4, got {self.width}")
        if self.posemb == "learn2d" and self.width % 2:
            raise ValueError(f"posemb 'learn2d' needs an even width, got {self.width}")
        for size, patch in zip(self.image_size, self.patch_size, strict=True):
            if size % patch:
                raise ValueError(
                    f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}: "
                    "choose an image size that is a multiple of the patch size (e.g. 224 for /16, 32 for /4)"
                )
        if not 0.0 <= self.dropout < 1.0 or not 0.0 <= self.attention_dropout < 1.0:
            raise ValueError("dropout rates must be in [0, 1)")

    @classmethod
    def from_variant(
        cls,
        name: str,
        image_size: int | tuple[int, int] = 224,
        num_classes: int = 1000,
        **overrides: Any,
    ) -> ViTConfig:
        """`"B/16"` → ViT-Base with 16x16 patches; any patch size after the slash, e.g. `"Ti/4"`.

        `overrides` set any other field (`pool`, `posemb`, `representation_size`, `dropout`, `hybrid`, `depth`…).
        """
        size, sep, patch = name.partition("/")
        if size not in VARIANTS or not sep or not patch.isdigit() or int(patch) < 1:
            raise ValueError(f"variant must look like 'B/16' with size in {sorted(VARIANTS)}, got {name!r}")
        depth, width, mlp_dim, heads = VARIANTS[size]
        fields = dict(depth=depth, width=width, mlp_dim=mlp_dim, num_heads=heads, variant=name)
        fields.update(overrides)
        return cls(image_size=image_size, patch_size=int(patch), num_classes=num_classes, **fields)

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patch grid (rows, columns); N = rows * columns."""
        return (self.image_size[0] // self.patch_size[0], self.image_size[1] // self.patch_size[1])

    @property
    def num_prefix_tokens(self) -> int:
        return 1 if self.pool == "tok" else 0

    def to_dict(self) -> dict[str, Any]:
        return _fields_as_json(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ViTConfig:
        check_known_fields(cls, values, "ViTConfig fields")
        return cls(**values)


# BiT's ResNet-v2 depths (Kolesnikov et al. 2020): units per stage.
BIT_DEPTHS: dict[int, tuple[int, ...]] = {
    26: (2, 2, 2, 2),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
}


@dataclass(frozen=True)
class BiTConfig(_ModelConfig):
    """A BiT ResNet-v2 classifier: `depth` in BIT_DEPTHS, stage widths 64·`width_factor`·2^i (x4 at the output).

    `image_size` is only the resolution it is trained and evaluated at: the network is fully convolutional."""

    depth: int = 50
    width_factor: float = 1.0
    num_classes: int = 1000
    image_size: tuple[int, int] = (224, 224)
    in_chans: int = 3
    head_bias_init: float = 0.0
    variant: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_size", _pair(self.image_size))
        if self.depth not in BIT_DEPTHS:
            raise ValueError(f"BiT depth must be one of {sorted(BIT_DEPTHS)}, got {self.depth!r}")
        if self.width_factor <= 0 or (64 * self.width_factor) % 1:
            raise ValueError(
                f"BiT width_factor must make 64 * width_factor a whole number, got {self.width_factor}"
            )

    @classmethod
    def from_variant(
        cls,
        name: str,
        image_size: int | tuple[int, int] = 224,
        num_classes: int = 1000,
        **overrides: Any,
    ) -> BiTConfig:
        """`"R50x1"` → BiT-R50x1 (ResNet-50, width factor 1); `"R26x0.5"` → ResNet-26 at half width."""
        match = re.fullmatch(r"R(\d+)x(\d+(?:\.\d+)?)", name)
        if not match or int(match[1]) not in BIT_DEPTHS:
            raise ValueError(
                f"BiT variant must look like 'R50x1' with depth in {sorted(BIT_DEPTHS)}, got {name!r}"
            )
        check_known_fields(cls, overrides, f"BiT model parameters of {name}")
        fields = dict(depth=int(match[1]), width_factor=float(match[2]), variant=name)
        fields.update(overrides)
        return cls(image_size=image_size, num_classes=num_classes, **fields)

    @property
    def width(self) -> int:
        """Channels of the root conv; stage i's bottleneck has width·2^i and outputs 4x that."""
        return int(64 * self.width_factor)

    @property
    def num_features(self) -> int:
        """Channels of the pooled representation (the head's input)."""
        return self.width * 2 ** (len(BIT_DEPTHS[self.depth]) - 1) * 4

    def to_dict(self) -> dict[str, Any]:
        return {"architecture": "bit", **_fields_as_json(self)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> BiTConfig:
        values = {k: v for k, v in values.items() if k != "architecture"}
        check_known_fields(cls, values, "BiTConfig fields")
        return cls(**values)
