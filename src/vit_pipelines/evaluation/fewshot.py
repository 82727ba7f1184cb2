"""Few-shot linear evaluation: regularised least squares from frozen features to {-1, 1}^K, in closed form.

big_vision's `fewshot_lsr` semantics (paper §4.1 "Metrics"): standardise each feature with the mean and std
(+1e-5) of the few-shot train set, append a constant feature 100 (an almost unregularised bias), targets
2·onehot − 1, and solve W = (XᵀX + λI)⁻¹XᵀY when N ≥ D, else Xᵀ(XXᵀ + λI)⁻¹Y. One eigendecomposition of XᵀX
(or XXᵀ) serves every λ. The fit is float64: the bias column makes XᵀX span ~10 orders of magnitude, which
float32 cannot hold next to a small λ.

Scoring needs only each test image's argmax over classes, so on CPUs that multiply float16 natively (AVX512-FP16:
Intel Sapphire Rapids and later; as fast as bfloat16 there, with 8x its precision) it runs in float16 with a
certificate: per row, the rounding error of the float16 product is bounded from |P|·|R| (unit roundoff 2⁻¹¹ for
each input and the output, plus underflow), and rows whose top-two margin is within that bound are re-scored in
float32. The predictions therefore equal float32 scoring's, which is what other CPUs run (torch's float16 matmul
there is a slow fallback: 27x float32's time on AMD Zen 4). Class scores
are first centred per row (subtracting the mean over classes of each row of R shifts every class of a test
image by the same amount: the argmax is unchanged), which removes the large common part the bias and the −1
targets put in every class and tightens the bound.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np
import scipy.stats
import torch

from vit_pipelines.data.cache import cache_images, label_array
from vit_pipelines.evaluation.features import extract_features
from vit_pipelines.models.vit import VisionTransformer

BIAS_CONSTANT = 100.0
DEFAULT_L2_REG = 2.0**10


@dataclass(frozen=True)
class RidgeSolver:
    """The λ-independent part of the solution: W(λ) = lhs · diag(1 / (eigs + λ)) · rhs."""

    mean: torch.Tensor
    std: torch.Tensor
    eigs: torch.Tensor
    lhs: torch.Tensor
    rhs: torch.Tensor
    q: torch.Tensor | None  # eigenvectors of XXᵀ (dual form) or None; used for leave-one-out
    x: torch.Tensor  # the standardised few-shot features with the bias column
    labels: torch.Tensor
    num_classes: int

    @classmethod
    def fit(cls, features: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor, num_classes: int):
        features = torch.as_tensor(features)
        labels = torch.as_tensor(labels, dtype=torch.long)
        if features.ndim != 2 or labels.shape != (features.shape[0],):
            raise ValueError(
                f"features must be [N, D] and labels [N], got {tuple(features.shape)} and {tuple(labels.shape)}"
            )
        n, d = features.shape[0], features.shape[1] + 1
        x = torch.empty(n, d, dtype=torch.float64)  # standardised in place, bias column appended
        x[:, -1] = BIAS_CONSTANT
        z = x[:, :-1].copy_(features)
        mean = z.mean(dim=0, keepdim=True)
        z.sub_(mean)  # two passes (mean, then squares of the centred values): no cancellation
        std = torch.from_numpy(np.einsum("ij,ij->j", z.numpy(), z.numpy()) / n).sqrt_().add_(1e-5)[None]
        z.div_(std)
        if n >= d:
            eigs, q = torch.linalg.eigh(_gram(x), UPLO="U")
            # Xᵀ(2·onehot − 1) = 2·(per-class sums of X)ᵀ − column sums: O(N·D) instead of an N·D·K product.
            class_sums = torch.zeros(num_classes, d, dtype=x.dtype).index_add_(0, labels, x)
            xty = 2.0 * class_sums.T - x.sum(dim=0)[:, None]
            return cls(mean, std, eigs, q, q.T @ xty, None, x, labels, num_classes)
        eigs, q = torch.linalg.eigh(_gram(x.T), UPLO="U")
        return cls(mean, std, eigs, x.T @ q, q.T @ _targets(labels, num_classes), q, x, labels, num_classes)

    @property
    def y(self) -> torch.Tensor:
        return _targets(self.labels, self.num_classes)

    def weights(self, l2_reg: float) -> torch.Tensor:
        return self.lhs @ (self.rhs / (self.eigs + l2_reg)[:, None])

    def accuracies(
        self, features: np.ndarray | torch.Tensor, labels: torch.Tensor, grid: Sequence[float]
    ) -> dict[float, float]:
        """Test accuracy for every λ in `grid`. The test features are projected onto `lhs` once (float32);
        each λ then costs one [N_test, r] x [r, K] product: float16 with a certified argmax where the CPU
        multiplies float16 natively, else float32 (module docstring)."""
        x = torch.as_tensor(features)
        # Written in place: the bias column, then (x − μ)/σ beside it.
        standardised = torch.empty(len(x), x.shape[1] + 1)
        standardised[:, -1] = BIAS_CONSTANT
        torch.sub(x.float(), self.mean.float(), out=standardised[:, :-1]).div_(self.std.float())
        projected = standardised @ self.lhs.float()
        scorer = _CertifiedArgmax(projected) if native_float16() else _Float32Argmax(projected)
        accuracies = {}
        # Class scores are centred per row (module docstring); centring over classes commutes with 1/(eigs + λ).
        rhs = (self.rhs - self.rhs.mean(dim=1, keepdim=True)).float()
        for lam in grid:
            predicted = scorer(rhs / (self.eigs + lam).float()[:, None])
            accuracies[lam] = predicted.eq(labels).double().mean().item()
        return accuracies

    def leave_one_out_accuracy(self, labels: torch.Tensor, l2_reg: float) -> float:
        """Exact leave-one-out accuracy on the few-shot set: prediction_i = (ŷ_i − h_ii·y_i) / (1 − h_ii)
        with the hat matrix H = X(XᵀX + λI)⁻¹Xᵀ from the same eigendecomposition."""
        shrink = self.eigs / (self.eigs + l2_reg)
        if self.q is not None:  # dual: H = Q diag(eigs / (eigs + λ)) Qᵀ
            hat_diag = (self.q**2) @ shrink
            fitted = self.q @ (shrink[:, None] * (self.q.T @ self.y))
        else:  # primal: H = X Q diag(1 / (eigs + λ)) Qᵀ Xᵀ
            xq = self.x @ self.lhs
            hat_diag = (xq**2) @ (1.0 / (self.eigs + l2_reg))
            fitted = self.x @ self.weights(l2_reg)
        loo = (fitted - hat_diag[:, None] * self.y) / (1.0 - hat_diag)[:, None]
        return (loo.argmax(dim=1) == labels).double().mean().item()


# float16 rounding: |fl(a) − a| ≤ u·|a| + η, with u = 2⁻¹¹ and η = 2⁻²⁵ (half the smallest subnormal).
_HALF_U = 2.0**-11
_HALF_TINY = 2.0**-25


def native_float16() -> bool:
    """Whether this CPU's float16 matmul runs on oneDNN's native kernels (AVX512-FP16 or AMX-FP16)."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_fp16_supported", None)
    return bool(check is not None and check())


class _Float32Argmax:
    """argmax over classes of P·R in float32: the reference `_CertifiedArgmax` equals."""

    def __init__(self, projected: torch.Tensor) -> None:
        self.projected = projected

    def __call__(self, r32: torch.Tensor) -> torch.Tensor:
        return (self.projected @ r32).argmax(dim=1)


class _CertifiedArgmax:
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
        # an int16 max is ~5x faster than a float16 top-k here. A negative runner-up is replaced by 0, an upper
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


def _gram(x: torch.Tensor, blocks: int = 3) -> torch.Tensor:
    """The upper triangle of xᵀx (the rest zero), one GEMM per block row: ~20% faster than the full product,
    whose lower half repeats the upper."""
    d = x.shape[1]
    gram = torch.zeros(d, d, dtype=x.dtype)
    edges = [round(i * d / blocks) for i in range(blocks + 1)]
    for start, stop in itertools.pairwise(edges):
        gram[start:stop, start:] = x[:, start:stop].T @ x[:, start:]
    return gram


def _power_of_two_scale(magnitude: torch.Tensor) -> torch.Tensor:
    """2^-e with magnitude · 2^-e in [0.5, 1): multiplying by it is exact (zeros are left alone)."""
    exponent = torch.frexp(magnitude).exponent
    return torch.where(magnitude > 0, torch.exp2(-exponent.to(magnitude.dtype)), 1.0)


def _targets(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    return 2.0 * torch.nn.functional.one_hot(labels, num_classes).double() - 1.0


def fewshot_ridge(
    train_features: np.ndarray | torch.Tensor,
    train_labels: np.ndarray | torch.Tensor,
    test_features: np.ndarray | torch.Tensor,
    test_labels: np.ndarray | torch.Tensor,
    l2_reg: float | Sequence[float] = DEFAULT_L2_REG,
    num_classes: int | None = None,
) -> float | dict[float, float]:
    """Test accuracy of the closed-form ridge classifier fitted on the few-shot train set.

    `l2_reg` a number → accuracy; a sequence → {λ: accuracy}, all from one decomposition.
    `num_classes` defaults to 1 + the largest label seen in either set.
    """
    train_labels = torch.as_tensor(train_labels, dtype=torch.long)
    test_labels = torch.as_tensor(test_labels, dtype=torch.long)
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    solver = RidgeSolver.fit(train_features, train_labels, num_classes)
    grid = [float(l2_reg)] if np.isscalar(l2_reg) else [float(v) for v in l2_reg]
    accuracies = solver.accuracies(test_features, test_labels, grid)
    return accuracies[grid[0]] if np.isscalar(l2_reg) else accuracies


def select_l2_reg(
    features: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    grid: Sequence[float],
    num_classes: int,
) -> float:
    """The λ in `grid` with the best exact leave-one-out accuracy on the few-shot set itself (ties: the
    largest λ). With one shot per class nothing can be held out, so the default λ = 2¹⁰ is returned."""
    labels = torch.as_tensor(labels, dtype=torch.long)
    if torch.bincount(labels, minlength=num_classes).min() < 2:
        return DEFAULT_L2_REG
    solver = RidgeSolver.fit(features, labels, num_classes)
    scores = {lam: solver.leave_one_out_accuracy(labels, lam) for lam in sorted(grid)}
    best = max(scores.values())
    return max(lam for lam, score in scores.items() if score == best)


def sample_shots(labels: np.ndarray, shots: int, seed: int) -> np.ndarray:
    """big_vision's few-shot subset: per class, a seeded shuffle of its indices, first `shots` taken."""
    rng = np.random.default_rng(seed)
    picked = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        if len(members) < shots:
            raise ValueError(f"class {c} has {len(members)} training examples, fewer than {shots} shots")
        picked.append(rng.permutation(members)[:shots])
    return np.sort(np.concatenate(picked))


def check_fewshot_params(params: dict[str, Any], where: str) -> None:
    """The probe's settings in range: shots and seeds whole numbers >= 1, λ > 0, a pool of >= max(shots)."""

    def whole(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 1

    shots = params.get("shots", [])
    if not isinstance(shots, list) or not shots or not all(whole(k) for k in shots):
        raise ValueError(f"{where}.shots must be a list of whole numbers >= 1, got {shots!r}")
    if not whole(params.get("seeds", 1)):
        raise ValueError(f"{where}.seeds must be a whole number >= 1, got {params.get('seeds')!r}")
    grid = params.get("l2_grid") or [params.get("l2_reg", 1.0)]
    if not all(isinstance(lam, int | float) and not isinstance(lam, bool) and lam > 0 for lam in grid):
        raise ValueError(f"{where}: l2_reg and l2_grid values must be > 0, got {grid!r}")
    pool = params.get("max_train_per_class")
    if pool is not None and (not whole(pool) or pool < max(shots)):
        raise ValueError(
            f"{where}.max_train_per_class must be null or >= the most shots ({max(shots)}), got {pool!r}"
        )


def fewshot_pool(labels: np.ndarray, per_class: int | None, seed: int = 0) -> np.ndarray:
    """The train rows few-shot subsets are drawn from, ascending: per class the first `per_class` of a seeded
    shuffle (big_vision draws from a fixed `train[:N]`), or every row where None. Only these need features:
    at most `per_class` x classes forward passes, however large the train split."""
    if per_class is None:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    return np.sort(
        np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in np.unique(labels)])
    )


def mean_and_ci95(values: Sequence[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% Student-t confidence interval (0 for a single value)."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2:
        return float(values.mean()), 0.0
    sem = values.std(ddof=1) / np.sqrt(len(values))
    return float(values.mean()), float(scipy.stats.t.ppf(0.975, len(values) - 1) * sem)


def fewshot_grid(
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    shots: Sequence[int] = (1, 5, 10, 25),
    seeds: int = 3,
    l2_reg: float = DEFAULT_L2_REG,
    l2_grid: Sequence[float] | None = None,
) -> dict[str, dict]:
    """Accuracy for every shot count over `seeds` seeded subsets: `{str(shots): {"mean", "ci95", "per_seed",
    "l2_reg"}}`. With `l2_grid`, each subset picks its λ by leave-one-out on itself instead of `l2_reg`."""
    (x_train, y_train), (x_test, y_test) = train, test
    num_classes = int(max(y_train.max(), y_test.max())) + 1
    results = {}
    for k in shots:
        per_seed, chosen = [], []
        for seed in range(seeds):
            idx = sample_shots(y_train, k, seed)
            lam = select_l2_reg(x_train[idx], y_train[idx], l2_grid, num_classes) if l2_grid else l2_reg
            chosen.append(lam)
            per_seed.append(fewshot_ridge(x_train[idx], y_train[idx], x_test, y_test, lam, num_classes))
        mean, ci = mean_and_ci95(per_seed)
        results[str(k)] = {"mean": mean, "ci95": ci, "per_seed": per_seed, "l2_reg": chosen}
    return results


def pp_for_size(template: str, size: tuple[int, int]) -> str:
    """Fill a pp template's `{size}` with a model's resolution: `32` for square images, else `(h, w)`."""
    return template.format(size=size[0] if size[0] == size[1] else tuple(size))


def cache_fewshot_sets(
    raw: dict[str, tuple[datasets.Dataset, datasets.Dataset]], pp_cache: str, per_class: int | None = None
) -> dict[str, tuple[datasets.Dataset, datasets.Dataset]]:
    """Decode and resize each downstream (train pool, test) pair once; the pool is `fewshot_pool`'s."""
    return {
        name: (
            cache_images(train.select(fewshot_pool(label_array(train), per_class)), pp_cache)[0],
            cache_images(test, pp_cache)[0],
        )
        for name, (train, test) in raw.items()
    }


def fewshot_accuracies(
    model: VisionTransformer,
    sets: dict[str, tuple[datasets.Dataset, datasets.Dataset]],
    pp: str,
    shots: Sequence[int],
    seeds: int = 1,
    l2_reg: float = DEFAULT_L2_REG,
) -> dict[str, float]:
    """`{"<set>_<k>shot_accuracy": mean over seeds}`: the quick probe run during pretraining (paper Fig. 4)."""
    out = {}
    for name, (train_cache, test_cache) in sets.items():
        train = extract_features(model, train_cache, pp, desc=f"{name} train")
        test = extract_features(model, test_cache, pp, desc=f"{name} test")
        for k, result in fewshot_grid(train, test, shots, seeds, l2_reg).items():
            out[f"{name}_{k}shot_accuracy"] = result["mean"]
    return out
