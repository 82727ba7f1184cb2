"""Few-shot linear evaluation: regularised least squares from frozen features to {-1, 1}^K, in closed form.

big_vision's `fewshot_lsr` semantics (paper §4.1 "Metrics"): standardise each feature with the mean and std
(+1e-5) of the few-shot train set, append a constant feature 100 (an almost unregularised bias), targets
2·onehot − 1, and solve W = (XᵀX + λI)⁻¹XᵀY when N ≥ D, else Xᵀ(XXᵀ + λI)⁻¹Y. One eigendecomposition of XᵀX
(or XXᵀ) serves every λ: with XᵀX = QΛQᵀ, W(λ) = Q diag(1 / (Λ + λ)) QᵀXᵀY. The fit is float64: the bias
column makes XᵀX span ~10 orders of magnitude, which float32 cannot hold next to a small λ. Test images are
scored by `scoring.argmax_scorer`, whose predictions equal float32 scoring's.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from vit_pipelines.evaluation import scoring

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
        each λ then costs one [N_test, r] x [r, K] product, scored by `scoring.argmax_scorer`."""
        x = torch.as_tensor(features)
        # Written in place: the bias column, then (x − μ)/σ beside it.
        standardised = torch.empty(len(x), x.shape[1] + 1)
        standardised[:, -1] = BIAS_CONSTANT
        torch.sub(x.float(), self.mean.float(), out=standardised[:, :-1]).div_(self.std.float())
        scorer = scoring.argmax_scorer(standardised @ self.lhs.float())
        accuracies = {}
        # Centring class scores per row leaves each argmax alone and tightens float16's error bound; it commutes
        # with 1/(eigs + λ).
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


def _gram(x: torch.Tensor, blocks: int = 3) -> torch.Tensor:
    """The upper triangle of xᵀx (the rest zero), one GEMM per block row: the lower half repeats the upper and
    is not computed."""
    d = x.shape[1]
    gram = torch.zeros(d, d, dtype=x.dtype)
    edges = [round(i * d / blocks) for i in range(blocks + 1)]
    for start, stop in itertools.pairwise(edges):
        gram[start:stop, start:] = x[:, start:stop].T @ x[:, start:]
    return gram


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
