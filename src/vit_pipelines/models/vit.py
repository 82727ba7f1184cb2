"""The Vision Transformer of Dosovitskiy et al. (2020), §3.1, with vit_jax's initialisation.

Pre-LN encoder blocks, a [class] token or global average pooling, optional tanh pre-logits layer and an
optional BiT ResNet stem (hybrid). Dropout sits after every dense layer except qkv, and after adding the
position embeddings (App. B.1).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vit_pipelines.models import fastpath
from vit_pipelines.models.config import ViTConfig
from vit_pipelines.models.posemb import LearnedPosEmb2d, posemb_sincos_2d
from vit_pipelines.models.resnet import resnet_stem_from_name

LN_EPS = 1e-6


class Attention(nn.Module):
    def __init__(self, width: int, num_heads: int, dropout: float, attention_dropout: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.attention_dropout = attention_dropout
        self.proj_drop = nn.Dropout(dropout)

    def forward(
        self, x: torch.Tensor, return_attention: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.attend(*self.heads(x), return_attention)

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every token's query, key and value, `[B, heads, N, Dh]` each."""
        b, n, d = x.shape
        return self.qkv(x).view(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, return_attention: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """softmax(q·kᵀ / √Dh)·v for queries `[B, heads, Nq, Dh]` against keys and values `[B, heads, N, Dh]`,
        then the projection: `[B, Nq, D]`, and the attention weights if asked."""
        b, _, nq, _ = q.shape
        p = self.attention_dropout if self.training else 0.0
        weights = None
        if return_attention:
            scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
            weights = scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype)
            out = (F.dropout(weights, p) if p > 0 else weights) @ v
        else:
            out = fastpath.attention(q, k, v, p)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, nq, -1))), weights


class Mlp(nn.Sequential):
    def __init__(self, width: int, mlp_dim: int, dropout: float) -> None:
        super().__init__(
            nn.Linear(width, mlp_dim),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(mlp_dim, width),
            nn.Dropout(dropout),
        )


class Block(nn.Module):
    """x + MSA(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(config.width, eps=LN_EPS)
        self.attn = Attention(config.width, config.num_heads, config.dropout, config.attention_dropout)
        self.norm2 = nn.LayerNorm(config.width, eps=LN_EPS)
        self.mlp = Mlp(config.width, config.mlp_dim, config.dropout)

    def forward(
        self, x: torch.Tensor, return_attention: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        y, weights = self.attn(self.norm1(x), return_attention)
        x = x + y
        return x + self.mlp(self.norm2(x)), weights


class PatchEmbed(nn.Module):
    """Image → `[B, N, D]` patch tokens: a strided conv, after a BiT ResNet stem for hybrids."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.stem = resnet_stem_from_name(config.hybrid) if config.hybrid else None
        in_chans, kernel = config.in_chans, config.patch_size
        if self.stem is not None:
            if any(p % self.stem.reduction for p in config.patch_size):
                raise ValueError(
                    f"hybrid patch_size {config.patch_size} must be a multiple of {self.stem.reduction}"
                )
            in_chans = self.stem.out_channels
            kernel = tuple(p // self.stem.reduction for p in config.patch_size)
        self.proj = nn.Conv2d(in_chans, config.width, kernel_size=kernel, stride=kernel)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.stem(images) if self.stem is not None else images
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    """`model(images)` → logits `[B, K]` for float images `[B, 3, H, W]` scaled to [-1, 1]."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.config = config
        d, grid = config.width, config.grid_size
        n = grid[0] * grid[1]
        self.patch_embed = PatchEmbed(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d)) if config.pool == "tok" else None
        self.pos_embed: nn.Parameter | None = None
        self.pos_embed_2d: LearnedPosEmb2d | None = None
        if config.posemb == "learn":  # vit_jax: one learned vector per token, the [class] token's included
            self.pos_embed = nn.Parameter(torch.empty(1, config.num_prefix_tokens + n, d).normal_(std=0.02))
        elif config.posemb == "learn2d":
            self.pos_embed_2d = LearnedPosEmb2d(grid, d)
        elif config.posemb == "sincos2d":
            self.register_buffer("pos_embed_fixed", posemb_sincos_2d(grid, d), persistent=False)
        self.pos_drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.depth))
        self.norm = nn.LayerNorm(d, eps=LN_EPS)
        rep = config.representation_size
        self.pre_logits = nn.Sequential(nn.Linear(d, rep), nn.Tanh()) if rep else nn.Identity()
        self.head = nn.Linear(rep or d, config.num_classes)
        self.activation_checkpointing = False  # set by training: blocks recompute activations in backward
        self.reset_parameters()

    @classmethod
    def from_seed(cls, config: ViTConfig, seed: int) -> VisionTransformer:
        """A freshly initialised model whose weights depend on `seed` alone, not on what ran before in the
        process (every rank and every re-run starts the same); the global RNG is left as it was."""
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return cls(config)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """vit_jax init: xavier-uniform dense kernels, N(0, 1e-6) MLP biases, lecun-normal patch conv, zero head."""
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                if name.endswith("attn.qkv"):  # xavier over each of q, k, v as vit_jax's separate kernels
                    bound = math.sqrt(6.0 / (module.in_features + module.out_features // 3))
                    nn.init.uniform_(module.weight, -bound, bound)
                else:
                    nn.init.xavier_uniform_(module.weight)
                if ".mlp." in f"{name}.":
                    nn.init.normal_(module.bias, std=1e-6)
                else:
                    nn.init.zeros_(module.bias)
        if self.config.representation_size:  # vit_jax's pre_logits keep flax's default lecun-normal kernel
            _lecun_normal_(self.pre_logits[0].weight)
        _lecun_normal_(self.patch_embed.proj.weight)
        nn.init.zeros_(self.patch_embed.proj.bias)
        nn.init.zeros_(self.head.weight)
        nn.init.constant_(self.head.bias, self.config.head_bias_init)

    def position_embedding(self) -> torch.Tensor | None:
        """`[1, prefix + N, D]` for "learn", `[1, N, D]` for the 2-D kinds, None for "none"."""
        if self.pos_embed is not None:
            return self.pos_embed
        if self.pos_embed_2d is not None:
            return self.pos_embed_2d()
        return getattr(self, "pos_embed_fixed", None)

    def forward_features(
        self, images: torch.Tensor, return_attention: bool = False, tokens: bool = True
    ) -> dict[str, object]:
        """Returns `tokens` `[B, prefix + N, D]` after the final norm, `pre_logits` `[B, D or rep]`,
        `grid` (rows, columns) and, if asked, `attention`: per layer `[B, heads, prefix + N, prefix + N]`.
        `tokens=False` leaves `tokens` out, for callers that want only `pre_logits`: with [class]-token pooling
        the final layer norm then runs on that token alone (it is per token, so `pre_logits` are the same)."""
        if images.shape[-2:] != self.config.image_size:
            raise ValueError(
                f"images are {tuple(images.shape[-2:])} but the model was built for {self.config.image_size}; "
                "resize the position embedding for a new resolution"
            )
        return self.encode(self.patch_embed(images), return_attention, tokens)

    def encode(
        self, x: torch.Tensor, return_attention: bool = False, tokens: bool = True
    ) -> dict[str, object]:
        """`forward_features` from the patch embeddings `[B, N, D]` on (masked patch prediction corrupts them)."""
        pe = self.position_embedding()
        covers_prefix = self.pos_embed is not None and self.cls_token is not None
        if pe is not None and not covers_prefix:  # 2-D embeddings cover the patches only (as in big_vision)
            x = x + pe
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        if covers_prefix:
            x = x + pe
        x = self.pos_drop(x)
        attention = []
        if return_attention:
            for block in self.blocks:
                x, weights = block(x, return_attention=True)
                attention.append(weights)
        else:  # the same blocks, fast where they can be; the last computes the [class] token alone if pooled
            recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
            first_token = self.cls_token is not None and not tokens
            x = fastpath.encoder(self.blocks, x, first_token=first_token, recompute=recompute)
        if self.cls_token is not None and not tokens:
            pooled = self.norm(x[:, 0])
        else:
            x = self.norm(x)
            pooled = x[:, 0] if self.cls_token is not None else x.mean(dim=1)
        out: dict[str, object] = {"pre_logits": self.pre_logits(pooled), "grid": self.config.grid_size}
        if tokens:
            out["tokens"] = x
        if return_attention:
            out["attention"] = attention
        return out

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(images, tokens=False)["pre_logits"])

    def patch_tokens(self, features: dict[str, object]) -> torch.Tensor:
        """The final patch-token grid `[B, rows, columns, D]`, [class] token excluded."""
        tokens = features["tokens"][:, self.config.num_prefix_tokens :]
        return tokens.reshape(tokens.shape[0], *self.config.grid_size, -1)


def _lecun_normal_(weight: torch.Tensor) -> None:
    # flax's lecun_normal: a normal truncated at ±2 std, its std corrected for the truncation.
    std = math.sqrt(1.0 / weight[0].numel()) / 0.87962566103423978
    nn.init.trunc_normal_(weight, std=std, a=-2.0 * std, b=2.0 * std)
