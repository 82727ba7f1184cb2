"""The encoder block in bfloat16 on AVX-512 CPUs: oneDNN matmuls with fused element-wise kernels between them.

Under `torch.autocast("cpu", torch.bfloat16)` an eager block spends as long between its matmuls as in them
(benchmarks/train_throughput.py): float32 layer norms then casts, a bias broadcast before each addmm, a float32
softmax and its casts, head (un)folding copies, GELU, bias-gradient column sums. `fused_block` computes the same
function, x ↦ x + MSA(LN(x)) ↦ x + MLP(LN(x)), with its own forward and backward: the matmuls run bias-free in
bfloat16 (float32 accumulation) and one kernel per group of element-wise work (`csrc/fused_cpu.cpp`) adds the
bias where the next pass reads the data anyway. Attention is one kernel each way: per image and head, its
matmuls run on AMX tiles (Sapphire Rapids and later; AVX-512 vdpbf16ps or FMAs elsewhere) from per-thread
scratch, with the softmax between them, so only q, k, v, the probabilities and the output touch memory; its
backward also sums the qkv weight gradient on the tiles while the gradient rows are in cache. Precision matches
autocast's: residual stream, layer-norm statistics, attention scores, softmax and GELU in float32, matmul operands
in bfloat16, parameter gradients in float32. The GELU's derivative is computed in the forward pass, next to the
GELU, and kept in bfloat16 like the activations; the backward pass then only multiplies by it.

The kernels are compiled on first use with torch's C++ extension builder (a C++ compiler that knows AMX, i.e.
GCC ≥ 11 or Clang ≥ 12, and about a minute), then cached in a folder of their own per source, flags and torch
version under `~/.cache/vit-pipelines/kernels` (`VIT_KERNELS_DIR`). A build lock left by a killed build is
reported by name after `BUILD_LOCK_SECONDS`, never waited on forever. Where they cannot be built or do not apply (no AVX-512, a GPU, float32 training, dropout, attention maps asked for, `torch.compile`
tracing) the model runs its plain modules; `VIT_FUSED_CPU=0` forces that.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import weakref
from pathlib import Path
from types import ModuleType
from typing import NamedTuple

import torch

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("csrc") / "fused_cpu.cpp"
_FLAGS = ["-O3", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"]
_FLAGS += ["-mamx-tile", "-mamx-bf16", "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"]
if torch.cpu._is_avx512_bf16_supported():  # one-instruction float32 → bfloat16 rounding
    _FLAGS.append("-mavx512bf16")
BUILD_LOCK_SECONDS = 600  # a build takes about a minute; a lock older than this was left by a killed build
_kernels: ModuleType | None = None
_tried = False
_amx = False  # whether the kernels' own products use the AMX tiles (else AVX-512 vdpbf16ps or FMAs)


def kernels() -> ModuleType | None:
    """The compiled kernels, built on the first call; None where this machine cannot run them."""
    global _kernels, _tried, _amx
    if not _tried:
        _tried = True
        if os.environ.get("VIT_FUSED_CPU", "1") == "0":
            log.info("VIT_FUSED_CPU=0: fused CPU kernels off")
        elif torch.backends.cpu.get_cpu_capability() not in ("AVX512", "AMX"):
            log.info("no AVX-512 on this CPU: fused CPU kernels off")
        else:
            try:
                from torch.utils import cpp_extension

                folder = build_folder()
                wait_for_build_lock(folder)
                flags = {
                    "extra_cflags": _FLAGS,
                    "extra_ldflags": ["-fopenmp"],
                    "build_directory": str(folder),
                }
                _kernels = cpp_extension.load("vit_pipelines_fused_cpu", [str(_SOURCE)], **flags)
                _amx = _kernels.amx_ready()
            except (
                Exception
            ) as error:  # no compiler or ninja, a stale build lock: the plain modules still work
                log.warning("fused CPU kernels unavailable (%s); using the plain modules", error)
    return _kernels


def build_folder() -> Path:
    """This source's, flags' and torch's own build folder: clones and torch versions never rebuild each other's."""
    key = hashlib.sha1(
        "|".join([str(_SOURCE), _SOURCE.read_text(), *_FLAGS, torch.__version__]).encode()
    ).hexdigest()[:16]
    root = Path(os.environ.get("VIT_KERNELS_DIR", Path.home() / ".cache" / "vit-pipelines" / "kernels"))
    folder = root / key
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def wait_for_build_lock(folder: Path, stale_after: float = BUILD_LOCK_SECONDS, poll: float = 1.0) -> None:
    """Wait while another process builds in `folder` (torch's `lock` file); raise naming the lock once it is
    older than `stale_after` seconds, as a killed build leaves it (torch itself would wait forever)."""
    lock = folder / "lock"
    while True:
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            return
        if age > stale_after:
            raise TimeoutError(
                f"the kernel build lock {lock} is {age:.0f} s old, left by a killed build: delete it"
            )
        time.sleep(poll)


def applies(block: torch.nn.Module, x: torch.Tensor) -> bool:
    """Whether `fused_block` computes `block(x)` here: bf16 autocast on CPU, float32 input, no dropout active,
    widths the kernels handle, not being traced by `torch.compile`, kernels built."""
    attn = block.attn
    width, heads = x.shape[-1], attn.num_heads
    dropout = block.training and (attn.attention_dropout > 0 or attn.proj_drop.p > 0 or block.mlp[2].p > 0)
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and x.dim() == 3
        and torch.is_autocast_enabled("cpu")
        and torch.get_autocast_dtype("cpu") == torch.bfloat16
        and not dropout
        and width % 16 == 0
        and block.mlp[0].out_features % 16 == 0
        and (width // heads) % 16 == 0
        and not torch.compiler.is_compiling()
        and kernels() is not None
    )


def fused_block(
    block: torch.nn.Module, x: torch.Tensor, next_norm: torch.nn.LayerNorm | None = None
) -> torch.Tensor:
    """`block(x)` for a `vit.Block` through the fused kernels (check `applies` first). With `next_norm`, the next
    block's first layer norm, neighbouring blocks share passes over the rows (`_Handover`): forward, this block's
    last residual add also normalizes its output rows for the next block; backward, the backward pass of the next
    block's first layer norm also computes this block's fc2 output gradient with its bias and weight gradients."""
    x = x.contiguous()
    next_eps = next_norm.eps if next_norm is not None else 0.0
    shape = (block.attn.num_heads, block.norm1.eps, block.norm2.eps, next_eps)
    received = _Handover.take_forward(x, block.norm1)
    out, *for_next = _FusedBlock.apply(x, received, shape, *BlockWeights.of(block, next_norm))
    if next_norm is not None and not out.is_inference():  # inference tensors have no version counter to check
        _Handover.give_forward(out, next_norm, for_next)
    return out


def first_token_norm(norm: torch.nn.LayerNorm, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(norm(x), x[:, :1])` for the last block under [class]-token pooling (`vit.Block.forward`'s
    first_token; check `applies` first), the norm's output in bfloat16 as the fused block's matmuls read it. The
    block before hands over that norm of its output (`_Handover`); backward, the norm's backward pass adds the
    gradient of the first token's residual and computes the previous block's fc2 gradients, as between fused
    blocks."""
    x = x.contiguous()
    return _FirstTokenNorm.apply(x, *_Handover.take_forward(x, norm), norm.weight, norm.bias, norm.eps)


class BlockWeights(NamedTuple):
    """A block's parameters in the order the fused block takes them, and the next block's first layer norm's
    (None where there is none: its output is then not normalized for a next block)."""

    ln1_w: torch.Tensor
    ln1_b: torch.Tensor
    qkv_w: torch.Tensor
    qkv_b: torch.Tensor
    proj_w: torch.Tensor
    proj_b: torch.Tensor
    ln2_w: torch.Tensor
    ln2_b: torch.Tensor
    fc1_w: torch.Tensor
    fc1_b: torch.Tensor
    fc2_w: torch.Tensor
    fc2_b: torch.Tensor
    next_w: torch.Tensor | None
    next_b: torch.Tensor | None

    @classmethod
    def of(cls, block: torch.nn.Module, next_norm: torch.nn.LayerNorm | None) -> BlockWeights:
        layers = (block.norm1, block.attn.qkv, block.attn.proj, block.norm2, block.mlp[0], block.mlp[3])
        following = (next_norm.weight, next_norm.bias) if next_norm is not None else (None, None)
        return cls(*(p for layer in layers for p in (layer.weight, layer.bias)), *following)


class _FirstTokenNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, h, mean, rstd, a_prev, weight, bias, eps):
        if h is None:
            h, mean, rstd = _kernels.layer_norm_fwd(x, weight, bias, eps)
        ctx.save_for_backward(x, mean, rstd, weight, a_prev)
        return h, x[:, :1].clone()

    @staticmethod
    def backward(ctx, dh, d_first):
        x, mean, rstd, weight, a_prev = ctx.saved_tensors
        g = torch.zeros_like(x)  # the residual's gradient: the first token's rows alone
        g[:, :1] = d_first
        gx, dw, db, *previous = _kernels.layer_norm_bwd(
            dh.contiguous(), x, mean, rstd, weight, g, a_prev, _amx
        )
        if previous:
            _Handover.give_backward(gx, previous)
        return gx, None, None, None, None, dw, db, None


class _Handover:
    """What a block computes for its neighbour in the encoder, held until the neighbour asks for it.

    Forward, block i gives block i + 1 its output normalized by block i + 1's first layer norm (h, mean, rstd) and
    its GELU output a. Backward, block i + 1's first layer-norm backward pass, given that a, also rounds its input
    gradient g (block i's output gradient) to bf16 and sums g's columns and gᵀ·a: block i's fc2 output gradient with
    fc2's bias and weight gradients, which block i then takes instead of reading g again. Each is used only for the
    very tensor it was computed from (same object, not modified since) and, forward, the same layer norm (same
    module, parameters not modified since); anything else (a hook replacing a block's output, gradients of an output
    used twice, a caller running the blocks its own way) finds nothing, and the block does that work itself."""

    # (weakref to block i's output, versions, the norm, [h, mean, rstd, a])
    forward: tuple | None = None
    # (block i's output gradient, its version, [g in bf16, fc2's bias and weight gradients])
    backward: tuple | None = None

    @staticmethod
    def versions(x: torch.Tensor, norm: torch.nn.LayerNorm) -> tuple[int, int, int]:
        return x._version, norm.weight._version, norm.bias._version

    @classmethod
    def give_forward(cls, out: torch.Tensor, norm: torch.nn.LayerNorm, values: list[torch.Tensor]) -> None:
        cls.forward = (weakref.ref(out), cls.versions(out, norm), norm, values)

    @classmethod
    def take_forward(cls, x: torch.Tensor, norm: torch.nn.LayerNorm) -> list[torch.Tensor | None]:
        held, cls.forward = cls.forward, None
        if held is not None and held[0]() is x and held[2] is norm and held[1] == cls.versions(x, norm):
            return held[3]
        return [None] * 4

    @classmethod
    def give_backward(cls, g: torch.Tensor, values: list[torch.Tensor]) -> None:
        # a strong reference: autograd hands the previous block this very tensor object while it lives
        cls.backward = (g, g._version, values)

    @classmethod
    def take_backward(cls, g: torch.Tensor) -> list[torch.Tensor] | None:
        held, cls.backward = cls.backward, None
        if held is not None and held[0] is g and held[1] == g._version:
            return held[2]
        return None


class _FusedBlock(torch.autograd.Function):
    """x + proj(attention(LN1(x))) = x1; x1 + fc2(GELU(fc1(LN2(x1)))). Shapes: x [B, N, D]; M = B·N rows.
    `handed`, from the previous block where it computed them (else None): LN1(x) as (h1, mean1, rstd1) and its
    GELU output a_prev. `shape`: (heads, eps1, eps2, next_eps). `weights`: `BlockWeights`; with the next block's
    layer norm, the outputs after `out` are that norm of it and this block's a, else None."""

    @staticmethod
    def forward(ctx, x, handed, shape, *weights):
        h1, mean1, rstd1, a_prev = handed
        heads, eps1, eps2, next_eps = shape
        w = BlockWeights(*weights)
        ops, (b, n, d) = _kernels, x.shape
        scale = (d // heads) ** -0.5
        w_qkv, w_proj, w_fc1, w_fc2 = (m.to(torch.bfloat16) for m in (w.qkv_w, w.proj_w, w.fc1_w, w.fc2_w))
        if h1 is None:
            h1, mean1, rstd1 = ops.layer_norm_fwd(x, w.ln1_w, w.ln1_b, eps1)
        qkv = torch.mm(h1.view(-1, d), w_qkv.t()).view(b, n, 3 * d)
        o, p = ops.attention_fwd(qkv, w.qkv_b, heads, scale, _amx)
        # the residual add and the second layer norm in one pass over the rows
        x1, h2, mean2, rstd2 = ops.add_bias_residual(
            x, torch.mm(o.view(-1, d), w_proj.t()).view(b, n, d), w.proj_b, w.ln2_w, w.ln2_b, eps2
        )
        z = torch.mm(h2.view(-1, d), w_fc1.t())
        a, gelu_grad = ops.bias_gelu_fwd(z, w.fc1_b)
        # and the last residual add with the next block's first layer norm, where there is one
        out, *following = ops.add_bias_residual(
            x1, torch.mm(a, w_fc2.t()).view(b, n, d), w.fc2_b, w.next_w, w.next_b, next_eps
        )
        if following:
            following.append(a)
            ctx.mark_non_differentiable(*following)
        ctx.set_materialize_grads(False)  # no zero gradients for those
        ctx.save_for_backward(x, h1, mean1, rstd1, qkv, p, o, x1, h2, mean2, rstd2, a, gelu_grad, a_prev)
        ctx.params = (w.ln1_w, w_qkv, w.qkv_b, w_proj, w.ln2_w, w_fc1, w_fc2)
        ctx.heads = heads
        ctx.scale = scale
        return (out, *following) if following else (out, None, None, None, None)

    @staticmethod
    def backward(ctx, g, *_):  # nothing flows back through what the next block was handed
        ops, scale = _kernels, ctx.scale
        x, h1, mean1, rstd1, qkv, p, o, x1, h2, mean2, rstd2, a, gelu_grad, a_prev = ctx.saved_tensors
        ln1_w, w_qkv, qkv_b, w_proj, ln2_w, w_fc1, w_fc2 = ctx.params
        (b, n, d), heads = x.shape, ctx.heads
        # MLP branch: out = x1 + fc2(GELU(fc1(h2))).
        # The kernels that compute a dense layer's output gradient g also sum its weight gradient gᵀ·x on the
        # tiles, block by block while g is in cache (cast_colsum: fc2, mul_colsum: fc1, layer_norm_bwd: proj,
        # attention_bwd: qkv): oneDNN ran these products through g's transposed view at half its rate for the
        # others, or from a transposed copy of g that the kernel had to write.
        handed = _Handover.take_backward(g)
        dy2, db_fc2, dw_fc2 = handed if handed is not None else ops.cast_colsum(g.contiguous(), a, _amx)
        dy2 = dy2.view(-1, d)
        dz, db_fc1, dw_fc1 = ops.mul_colsum(torch.mm(dy2, w_fc2), gelu_grad, h2, _amx)
        g1, dln2_w, dln2_b, dy1, db_proj, dw_proj = ops.layer_norm_bwd(
            torch.mm(dz, w_fc1).view(b, n, d), x1, mean2, rstd2, ln2_w, g, o, _amx
        )
        # Attention branch: x1 = x + proj(softmax(scale·q·kᵀ)·v).
        do = torch.mm(dy1.view(-1, d), w_proj).view(b, n, d)
        dqkv, dw_qkv, db_qkv = ops.attention_bwd(do, qkv, qkv_b, p, h1, heads, scale, _amx)
        dqkv = dqkv.view(-1, 3 * d)
        # the first layer norm's backward pass, with the previous block's fc2 gradients where it handed over its a
        gx, dln1_w, dln1_b, *previous = ops.layer_norm_bwd(
            torch.mm(dqkv, w_qkv).view(b, n, d), x, mean1, rstd1, ln1_w, g1, a_prev, _amx
        )
        if previous:
            _Handover.give_backward(gx, previous)
        # every parameter gradient comes out of the kernels in float32, the parameters' dtype
        grads = (dw_qkv, db_qkv, dw_proj, db_proj, dln2_w, dln2_b, dw_fc1, db_fc1, dw_fc2, db_fc2)
        return gx, None, None, dln1_w, dln1_b, *grads, None, None
