"""Speed tricks that leave `vit.py`'s maths alone, behind one dispatch: `encoder` runs the blocks.

* The fused CPU block (`fused_cpu.py`): bfloat16 blocks on AVX-512 CPUs, with neighbouring blocks sharing
  passes over the rows (the next block's first layer norm computed while this block's output is in cache).
* The first-token tail: under [class]-token pooling nothing reads the last block's other tokens, so that block
  computes the first token alone (`first_token_attention`).
* `attention`: PyTorch's fused attention kernels on accelerators; on CPU plain matmuls, which are faster there.

Each block is still called as a module, so hooks on blocks see (and may replace) its output as always.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from torch.distributed.fsdp import FSDPModule

from vit_pipelines.models import fused_cpu


def encoder(
    blocks: nn.ModuleList, x: torch.Tensor, first_token: bool = False, recompute: bool = False
) -> torch.Tensor:
    """`blocks` applied in turn to `x` [B, N, D]; with `first_token`, the last block's output is the first
    token's alone, [B, 1, D]. With `recompute` (activation checkpointing) a block keeps only its input and
    runs again in the backward pass: memory for compute, the same numbers (the RNG state is replayed)."""
    last = len(blocks) - 1
    for i, block in enumerate(blocks):
        if first_token and i == last:
            forward = functools.partial(first_token_block, block)
        # the fused blocks hand state on to the next one: they cannot be recomputed alone, nor run sharded
        # (a sharded block's weights are whole only inside its own call)
        elif not recompute and not isinstance(block, FSDPModule) and fused_cpu.applies(block, x):
            following = blocks[i + 1].norm1 if i < last else None
            forward = functools.partial(_fused, block, next_norm=following)
        else:
            forward = None
        if recompute:
            x, _ = torch.utils.checkpoint.checkpoint(_call, block, x, forward, use_reentrant=False)
        else:
            x, _ = _call(block, x, forward)
    return x


def first_token_block(block: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, None]:
    """`block(x)[0][:, :1]`: the first layer norm of every token, the rest for the first token only. On the
    fused CPU path that layer norm runs on the kernels, sharing passes with the block before."""
    if fused_cpu.applies(block, x):
        h, first = fused_cpu.first_token_norm(block.norm1, x)
    else:
        h, first = block.norm1(x), x[:, :1]
    x = first + first_token_attention(block.attn, h)
    return x + block.mlp(block.norm2(x)), None


def first_token_attention(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`attn(x)[0][:, :1]`, the first token's attention output `[B, 1, D]`, without any token's key or value.
    Per head, with that token's query q, the scores are q·(W_k x_j + b_k) = (W_kᵀ q)·x_j + q·b_k, the last
    term the same for every key j, so the softmax cancels it; and the output is Σ_j p_j (W_v x_j + b_v) =
    W_v (Σ_j p_j x_j) + (Σ_j p_j) b_v. So q goes through W_k onto the tokens and the weighted sum of the tokens
    through W_v: a few D-vectors per image and head instead of the [N, 2D] keys and values."""
    (b, _, d), h = x.shape, attn.num_heads
    w_q, w_k, w_v = attn.qkv.weight.view(3, h, d // h, d).unbind(0)
    b_q, _, b_v = attn.qkv.bias.view(3, h, d // h).unbind(0)
    q = F.linear(x[:, 0], w_q.reshape(d, d), b_q.reshape(d)).view(b, h, d // h)
    keys = torch.einsum("bhe,hed->bhd", q, w_k)  # [B, heads, D]: W_kᵀ q per head
    scores = (keys @ x.transpose(1, 2)) * (d // h) ** -0.5
    weights = scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype)
    p = attn.attention_dropout if attn.training else 0.0
    weights = F.dropout(weights, p) if p > 0 else weights
    mixed = weights @ x  # [B, heads, D]: Σ_j p_j x_j per head
    # Σ_j p_j: 1 but for rounding and dropout; summed in float32 at least, added in the output's dtype
    kept = weights.sum(-1, keepdim=True, dtype=torch.promote_types(weights.dtype, torch.float32))
    out = torch.einsum("bhd,hed->bhe", mixed, w_v)
    out = out + (kept * b_v).to(torch.promote_types(out.dtype, b_v.dtype))
    return attn.proj_drop(attn.proj(out.reshape(b, 1, d)))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float) -> torch.Tensor:
    """softmax(q·kᵀ / √d)·v for `[B, heads, N, Dh]` inputs, with attention dropout `dropout`."""
    if q.device.type != "cpu":  # flash / memory-efficient kernels
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
    # on CPU the fused kernel's bf16 backward is slower than plain matmuls; the softmax runs in float32, as HF's
    weights = (
        ((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5).softmax(dim=-1, dtype=torch.float32).to(q.dtype)
    )
    return (F.dropout(weights, dropout) if dropout > 0 else weights) @ v


def _fused(block: nn.Module, x: torch.Tensor, next_norm: nn.LayerNorm | None) -> tuple[torch.Tensor, None]:
    return fused_cpu.fused_block(block, x, next_norm), None


def _call(block: nn.Module, x: torch.Tensor, forward: Callable | None) -> tuple[torch.Tensor, None]:
    """`block(x)` through `forward` instead of `block.forward` where given, its hooks running as always."""
    if forward is None:
        return block(x)
    if torch.compiler.is_compiling():  # dynamo cannot trace a patched `forward`; a compiled step has no hooks
        return forward(x)
    block.forward = forward
    try:
        return block(x)
    finally:
        del block.forward
