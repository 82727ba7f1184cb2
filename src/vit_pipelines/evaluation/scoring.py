"""The argmax over classes of many test images' ridge scores, in float16 where that is both fast and exact.

Scoring needs only each test image's argmax over classes, so on CPUs that multiply float16 natively
(AVX512-FP16, AMX-FP16) it runs in float16 with a certificate: per row, the rounding error of the float16
product is bounded from |P|·|R| (unit roundoff 2⁻¹¹ for each input and the output, plus underflow), and rows
whose top-two margin is within that bound are re-scored in float32. The predictions therefore equal float32
scoring's, which is what other CPUs run (their float16 matmul is a slow fallback). docs/fewshot.md has the
measurements.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# float16 rounding: |fl(a) − a| ≤ u·|a| + η, with u = 2⁻¹¹ and η = 2⁻²⁵ (half the smallest subnormal).
_HALF_U = 2.0**-11
_HALF_TINY = 2.0**-25


def native_float16() -> bool:
    """Whether this CPU's float16 matmul runs on oneDNN's native kernels (AVX512-FP16 or AMX-FP16)."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_fp16_supported", None)
    return bool(check is not None and check())


class Float32Argmax:
    """argmax over classes of P·R in float32: the reference `CertifiedArgmax` equals."""

    def __init__(self, projected: torch.Tensor) -> None:
        self.projected = projected

    def __call__(self, r32: torch.Tensor) -> torch.Tensor:
        return (self.projected @ r32).argmax(dim=1)


class CertifiedArgmax:
    """argmax over classes of P·R for one P and many R, from float16 products whose error is bounded.

    P's rows and R are scaled by powers of two (exact; a positive factor per row leaves its argmax alone) so
    that no product or sum can overflow float16. Per row i, every class score is then within
        E_i = c·Σ_k |p_ik|·max_j |r_kj| + η·(‖p_i‖₁ + max_j ‖r_j‖₁) + r·η² + u·|score| + η
    of the exact one, with c = 1.05·(2u + u²) + r·2⁻²⁴: inputs rounded to float16, float32 accumulation over
    the rank r, float16 output; the 5% slack covers the rounding of the bound itself. Rows whose top-two
    margin exceeds 2E_i are certified; the rest are re-scored in float32.
    """

    def __init__(self, projected: torch.Tensor) -> None:
        self.projected = projected
        self.p16 = (projected * _power_of_two_scale(projected.abs().amax(dim=1, keepdim=True))).half()
        self.p_abs = self.p16.abs().float()
        self.p_l1 = self.p_abs.sum(dim=1)

    def __call__(self, r32: torch.Tensor) -> torch.Tensor:
        rank = r32.shape[0]
        # rank · max|p| · max|r| < 2¹⁵ bounds every |score| and partial sum well inside float16's 65504.
        r16 = (r32 * (2.0**15 * _power_of_two_scale(r32.abs().max() * rank))).half()
        r_abs = r16.abs().float()
        # Top two by the scores' bit patterns: for float16 values ≥ +0 the int16 order is the float order, and
        # an int16 max is much faster than a float16 top-k. A negative runner-up is replaced by 0, an upper
        # bound, which keeps the certificate sound; a row whose scores are all negative (int16 order reversed)
        # then has a negative margin and goes to float32. R is centred over classes, so each row's scores sum
        # to ~0 and such rows are rare.
        bits = (self.p16 @ r16).view(torch.int16)
        best_bits, predicted = bits.max(dim=1)
        bits[torch.arange(len(bits)), predicted] = torch.iinfo(torch.int16).min
        best = best_bits.view(torch.float16).float()
        runner_up = bits.amax(dim=1).clamp_min(0).view(torch.float16).float()
        inputs = (1.05 * (2 * _HALF_U + _HALF_U**2) + rank * 2.0**-24) * (self.p_abs @ r_abs.amax(dim=1))
        tiny = _HALF_TINY * (1 + _HALF_U) * (self.p_l1 + r_abs.sum(dim=0).max()) + rank * _HALF_TINY**2
        error = inputs + tiny + _HALF_U * torch.maximum(best.abs(), runner_up.abs()) + _HALF_TINY
        unsure = (best - runner_up <= 2.0 * error).nonzero().squeeze(1)
        predicted[unsure] = (self.projected[unsure] @ r32).argmax(dim=1)
        return predicted


def argmax_scorer(projected: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """`projected` [N, r] → a function R [r, K] ↦ argmax over classes of projected·R, per row: certified
    float16 where this CPU multiplies float16 natively, else float32."""
    return CertifiedArgmax(projected) if native_float16() else Float32Argmax(projected)


def _power_of_two_scale(magnitude: torch.Tensor) -> torch.Tensor:
    """2^-e with magnitude · 2^-e in [0.5, 1): multiplying by it is exact (zeros are left alone)."""
    exponent = torch.frexp(magnitude).exponent
    return torch.where(magnitude > 0, torch.exp2(-exponent.to(magnitude.dtype)), 1.0)
