"""Few-shot ridge: against a direct numpy transcription of the formulas and against scikit-learn's Ridge."""

import numpy as np
import pytest
import torch
from sklearn.linear_model import Ridge

from vit_pipelines.data import embedded
from vit_pipelines.evaluation import fewshot_ridge, scoring
from vit_pipelines.evaluation.fewshot import (
    cache_fewshot_sets,
    fewshot_grid,
    fewshot_pool,
    mean_and_ci95,
    sample_shots,
)
from vit_pipelines.evaluation.ridge import BIAS_CONSTANT, RidgeSolver, select_l2_reg
from vit_pipelines.evaluation.scoring import CertifiedArgmax


def blobs(n_per_class: int, dim: int, classes: int, seed: int, spread: float = 3.0):
    """Gaussian classes around centres fixed by (dim, classes), so train and test blobs share them."""
    centres = np.random.default_rng([dim, classes]).normal(size=(classes, dim)) * spread / np.sqrt(dim) * 4
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes), n_per_class)
    features = centres[labels] + rng.normal(size=(len(labels), dim)) + 5.0  # offset: standardisation matters
    return features.astype(np.float32), labels


def numpy_reference(x_train, y_train, x_test, l2_reg, classes):
    """The formulas of PAPER-NOTES, written out directly."""
    x_train, x_test = x_train.astype(np.float64), x_test.astype(np.float64)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-5
    a = np.hstack([(x_train - mean) / std, np.full((len(x_train), 1), 100.0)])
    b = np.hstack([(x_test - mean) / std, np.full((len(x_test), 1), 100.0)])
    y = 2.0 * np.eye(classes)[y_train] - 1.0
    n, d = a.shape
    if n >= d:
        w = np.linalg.solve(a.T @ a + l2_reg * np.eye(d), a.T @ y)
    else:
        w = a.T @ np.linalg.solve(a @ a.T + l2_reg * np.eye(n), y)
    return b @ w


@pytest.mark.parametrize(("n_per_class", "dim"), [(40, 16), (3, 64)])  # N ≥ D (primal) and N < D (dual)
def test_matches_the_formulas_in_both_forms(n_per_class, dim):
    x_train, y_train = blobs(n_per_class, dim, 5, seed=0)
    x_test, y_test = blobs(30, dim, 5, seed=1)
    solver = RidgeSolver.fit(x_train, y_train, 5)
    assert (solver.q is None) == (len(x_train) >= dim + 1)
    for lam in (1.0, 1024.0, 1e5):
        scores = numpy_reference(x_train, y_train, x_test, lam, 5)
        x = torch.as_tensor(x_test, dtype=torch.float64)
        ours = (x - solver.mean) / solver.std
        ours = torch.nn.functional.pad(ours, (0, 1), value=BIAS_CONSTANT) @ solver.weights(lam)
        np.testing.assert_allclose(ours.numpy(), scores, rtol=1e-6, atol=1e-8)
        expected = (scores.argmax(1) == y_test).mean()
        assert fewshot_ridge(x_train, y_train, x_test, y_test, lam) == pytest.approx(expected)


@pytest.mark.parametrize(("n_per_class", "dim"), [(25, 20), (2, 50)])
def test_matches_sklearn_ridge_with_the_same_bias_handling(n_per_class, dim):
    x_train, y_train = blobs(n_per_class, dim, 8, seed=2, spread=1.0)
    x_test, y_test = blobs(40, dim, 8, seed=3, spread=1.0)
    mean, std = x_train.astype(np.float64).mean(0), x_train.astype(np.float64).std(0) + 1e-5
    prep = lambda x: np.hstack([(x - mean) / std, np.full((len(x), 1), 100.0)])  # noqa: E731
    grid = [0.1, 10.0, 1024.0, 1e4]
    ours = fewshot_ridge(x_train, y_train, x_test, y_test, grid)
    for lam in grid:
        ridge = Ridge(alpha=lam, fit_intercept=False, solver="cholesky").fit(
            prep(x_train), 2 * np.eye(8)[y_train] - 1
        )
        sklearn_acc = (ridge.predict(prep(x_test)).argmax(1) == y_test).mean()
        print(f"λ={lam:g}: ours {ours[lam]:.4f} sklearn {sklearn_acc:.4f}")
        assert ours[lam] == pytest.approx(sklearn_acc)
    assert len(set(ours.values())) > 1  # λ matters on this data


@pytest.mark.parametrize("float16", [True, False], ids=["certified-float16", "float32"])
def test_scoring_gives_exactly_the_float64_predictions_even_when_ill_conditioned(float16, monkeypatch):
    """N just above D (one shot of many classes) makes XᵀX nearly singular: at small λ many float16 argmaxes are
    unreliable and must be caught by the error bound and re-scored; at every λ the accuracy equals float64's, with
    the certified float16 scorer (CPUs with native float16) and with float32 scoring (the others)."""
    scorers = []
    for name in ("CertifiedArgmax", "Float32Argmax"):
        cls = getattr(scoring, name)
        monkeypatch.setattr(scoring, name, lambda p, _cls=cls: scorers.append(_cls) or _cls(p))
    monkeypatch.setattr(scoring, "native_float16", lambda: float16)
    classes, dim = 300, 256
    x_train, y_train = blobs(1, dim, classes, seed=6, spread=2.0)
    x_test, y_test = blobs(6, dim, classes, seed=7, spread=2.0)
    grid = [0.25, 4.0, 64.0, 1024.0, 16384.0]
    ours = fewshot_ridge(x_train, y_train, x_test, y_test, grid)
    for lam in grid:
        expected = (numpy_reference(x_train, y_train, x_test, lam, classes).argmax(1) == y_test).mean()
        print(f"λ={lam:g}: ours {ours[lam]:.6f} float64 {expected:.6f}")
        assert ours[lam] == expected
    assert [s.__name__ for s in scorers] == ["CertifiedArgmax" if float16 else "Float32Argmax"]


def test_certified_float16_argmax_equals_the_float32_argmax_on_hard_rows():
    """The float16 scorer's predictions must equal float32 scoring's on every row: rows whose scores are all
    negative (their int16 bit order is reversed), exact ties (duplicate classes), near-ties far below float16's
    precision, and rows and class weights at extreme scales (float16 underflow/overflow without the scaling)."""
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(3000, 64, generator=gen)
    p[:500] *= 1e-15
    p[500:1000] *= 1e15
    r = torch.randn(64, 200, generator=gen)
    r[:, 1] = r[:, 0]  # an exact tie for every row
    r[:, 3] = r[:, 2] * (1 + 1e-6)  # near-ties
    r -= r.abs().max()  # rows with Σp > 0 score below zero everywhere
    scorer = CertifiedArgmax(p)
    for scale in (1e-15, 1.0, 1e15):  # products stay inside float32, the reference
        exact = p.double() @ (r.double() * scale)
        ours = scorer(r * scale)
        fp32 = (p @ (r * scale)).argmax(dim=1)
        assert (exact.max(dim=1).values < 0).sum() > 100  # the all-negative case is exercised
        assert torch.equal(ours, fp32), (ours != fp32).sum()
        # where float64 is unambiguous, both equal it
        top = exact.topk(2, dim=1).values
        clear = (top[:, 0] - top[:, 1]) > 1e-4 * top[:, 0].abs()
        assert clear.sum() > 1000 and torch.equal(ours[clear], exact.argmax(dim=1)[clear])


def test_default_lambda_is_1024_and_scalar_returns_a_float():
    x_train, y_train = blobs(5, 10, 3, seed=4)
    x_test, y_test = blobs(20, 10, 3, seed=5)
    acc = fewshot_ridge(x_train, y_train, x_test, y_test)
    assert isinstance(acc, float) and acc == fewshot_ridge(x_train, y_train, x_test, y_test, [1024.0])[1024.0]
    assert acc > 0.9  # well-separated blobs


def test_leave_one_out_equals_refitting_without_each_point():
    x, y = blobs(4, 6, 3, seed=6, spread=0.7)
    for dim_slice in (slice(None), slice(0, 2)):  # dual (N < D+1 is false here) and primal
        feats = x[:, dim_slice]
        solver = RidgeSolver.fit(feats, y, 3)
        lam = 3.0
        # Refit with the solver's own standardised features so only the held-out point differs.
        a, targets = solver.x.numpy(), solver.y.numpy()
        manual = []
        for i in range(len(a)):
            keep = np.arange(len(a)) != i
            w = np.linalg.solve(a[keep].T @ a[keep] + lam * np.eye(a.shape[1]), a[keep].T @ targets[keep])
            manual.append((a[i] @ w).argmax() == y[i])
        assert solver.leave_one_out_accuracy(torch.as_tensor(y), lam) == pytest.approx(np.mean(manual))


def test_select_l2_reg_prefers_strong_regularisation_on_noise_and_falls_back_for_one_shot():
    rng = np.random.default_rng(7)
    noise, labels = rng.normal(size=(30, 200)), np.repeat(np.arange(3), 10)
    x, y = blobs(10, 5, 3, seed=8)
    assert select_l2_reg(x, y, [1e-3, 1.0, 1e6], 3) < 1e6  # informative features: not the largest λ
    assert select_l2_reg(noise, labels, [1e-3, 1e6], 3) in (1e-3, 1e6)
    assert select_l2_reg(x[::10], y[::10], [1.0, 5.0], 3) == 1024.0


def test_sample_shots_is_class_balanced_seeded_and_prefix_consistent():
    labels = np.repeat(np.arange(4), 30)
    five = sample_shots(labels, 5, seed=0)
    assert np.bincount(labels[five]).tolist() == [5, 5, 5, 5]
    assert np.array_equal(five, sample_shots(labels, 5, seed=0))
    assert not np.array_equal(five, sample_shots(labels, 5, seed=1))
    assert set(sample_shots(labels, 1, seed=0)) <= set(five)  # the first k of the same shuffle
    with pytest.raises(ValueError, match="fewer than"):
        sample_shots(labels, 31, seed=0)


def test_confidence_interval_uses_student_t():
    mean, ci = mean_and_ci95([0.5, 0.6, 0.7])
    assert mean == pytest.approx(0.6)
    assert ci == pytest.approx(4.302653 * 0.1 / np.sqrt(3), rel=1e-5)
    assert mean_and_ci95([0.4]) == (0.4, 0.0)


def test_grid_reports_every_shot_count_with_seeds():
    x_train, y_train = blobs(30, 12, 4, seed=9)
    x_test, y_test = blobs(20, 12, 4, seed=10)
    results = fewshot_grid((x_train, y_train), (x_test, y_test), shots=(1, 5), seeds=3)
    assert set(results) == {"1", "5"}
    assert len(results["5"]["per_seed"]) == 3 and results["5"]["l2_reg"] == [1024.0] * 3
    assert results["5"]["mean"] >= results["1"]["mean"] - 0.05
    chosen = fewshot_grid((x_train, y_train), (x_test, y_test), shots=(5,), seeds=2, l2_grid=[1.0, 1024.0])
    assert all(lam in (1.0, 1024.0) for lam in chosen["5"]["l2_reg"])


def test_the_pool_bounds_the_train_images_that_need_features():
    labels = np.repeat(np.arange(4), [30, 12, 50, 7])
    pool = fewshot_pool(labels, 10)
    assert np.bincount(labels[pool]).tolist() == [10, 10, 10, 7]  # at most 10 per class, every class
    assert (np.diff(pool) > 0).all() and np.array_equal(pool, fewshot_pool(labels, 10))  # seeded, ascending
    assert np.array_equal(fewshot_pool(labels, None), np.arange(len(labels)))  # None: every row, as before
    digits = embedded.build_downstream("digits", image_size=16)
    sets = cache_fewshot_sets({"digits": (digits["train"], digits["test"])}, "decode", per_class=5)
    train, test = sets["digits"]
    assert len(train) == 5 * 10 and len(test) == len(digits["test"])  # 5 x classes forward passes for train
