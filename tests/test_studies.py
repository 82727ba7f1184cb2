"""The studies' pieces: nested subsets, each arm's settings, compute, the seed summary and the early checks."""

import numpy as np
import pytest

from vit_pipelines.evaluation.studies import (
    arm_settings,
    check_study,
    nested_subset,
    study_settings,
    summarise,
    training_flops_per_image,
)
from vit_pipelines.models.build import build_classifier

PRETRAIN = {
    "model": {"variant": "Ti/4", "image_size": 32, "depth": 6, "pool": "tok", "representation_size": 192},
    "train": {"steps": 600, "batch_size": 128, "lr": 1e-3, "warmup_steps": 50, "eval_every": 200},
    "eval": {"pp": "value_range(-1,1)", "batch_size": 256},
    "fewshot": {"enabled": True, "shots": [5, 10], "seeds": 1},
}


def test_nested_subsets_are_prefixes_of_one_seeded_permutation():
    small, medium, full = (nested_subset(1000, f, seed=0) for f in (0.1, 0.3, 1.0))
    assert (len(small), len(medium), len(full)) == (100, 300, 1000)
    assert set(small) < set(medium) < set(full) == set(range(1000))
    assert np.all(np.diff(medium) > 0)  # in cache order: sequential reads
    assert np.array_equal(nested_subset(1000, 0.3, seed=0), medium)
    assert not np.array_equal(nested_subset(1000, 0.3, seed=1), medium)
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        nested_subset(1000, 0.0, seed=0)


def test_an_arm_overrides_the_study_and_epochs_set_the_steps_of_its_subset():
    study = study_settings(PRETRAIN, {"seeds": [0], "train": {"steps": 200}, "fewshot": {"shots": [5]}})
    assert study["train"]["steps"] == 200 and study["train"]["eval_every"] == 0  # scored once, at the end
    assert study["fewshot"] == {"enabled": True, "shots": [5], "seeds": 1}
    vit = arm_settings(study, {"model": {"pool": "gap"}, "train": {"lr": 3e-4}}, {"fraction": 1.0}, 5000)
    assert vit["model"] == {**PRETRAIN["model"], "pool": "gap"} and vit["train"]["lr"] == 3e-4
    assert vit["train"]["steps"] == 200  # no epochs: the study's schedule
    # 10 epochs over 1000 images at batch 128: ceil(78.1) steps; the warmup shrinks to half of them
    bit = arm_settings(study, {"model": {"variant": "R26x0.5"}}, {"fraction": 0.1, "epochs": 10}, 1000)
    assert bit["model"] == {"image_size": 32, "variant": "R26x0.5"}  # a ResNet takes no ViT field
    assert (bit["train"]["steps"], bit["train"]["warmup_steps"]) == (79, 39)
    with pytest.raises(ValueError, match=r"unknown arm parameters \['modle'\]"):
        arm_settings(study, {"modle": {}}, {}, 10)


def test_training_flops_count_the_forward_and_backward_pass():
    shallow, deep = (
        build_classifier({"variant": "Ti/4", "image_size": 32, "depth": depth}, classes=10)
        for depth in (2, 4)
    )
    # two more full blocks: dense layers 2 (4 D² + 2 D·mlp) per token and attention 4 N² D, forward; the backward
    # pass computes gradients of inputs and of weights, twice the forward
    d, mlp, n = 192, 768, 65
    block = 2 * (4 * d * d + 2 * d * mlp) * n + 4 * n * n * d
    assert training_flops_per_image(deep) - training_flops_per_image(shallow) == 2 * 3 * block
    assert deep.training  # the model is left as it was
    bit = build_classifier({"variant": "R26x0.5", "image_size": 32}, classes=10)
    larger = build_classifier({"variant": "R26x0.5", "image_size": 64}, classes=10)
    # a convolution's FLOPs grow with the pixels (the head's do not)
    assert training_flops_per_image(larger) == pytest.approx(4 * training_flops_per_image(bit), rel=0.01)


def test_the_summary_has_the_mean_and_spread_over_seeds_of_every_score():
    runs = [
        {
            "minival_accuracy": 0.4,
            "fewshot": {"a_5shot": 0.2, "b_5shot": 0.4},
            "finetune": {"a": 0.5, "b": 0.7},
        },
        {
            "minival_accuracy": 0.5,
            "fewshot": {"a_5shot": 0.4, "b_5shot": 0.6},
            "finetune": {"a": 0.6, "b": 0.6},
        },
    ]
    summary = summarise(runs)
    expected = {
        "minival_accuracy": (0.45, 0.0707107, [0.4, 0.5]),
        "fewshot/mean_5shot": (0.4, 0.1414214, [0.3, 0.5]),
        "finetune/mean": (0.6, 0.0, [0.6, 0.6]),
    }
    for metric, (mean, std, values) in expected.items():
        assert summary[metric]["mean"] == pytest.approx(mean, rel=1e-5)
        assert summary[metric]["std"] == pytest.approx(std, rel=1e-5, abs=1e-12)
        assert summary[metric]["values"] == pytest.approx(values)  # per seed, for the figures
    assert summary["finetune/a"]["mean"] == pytest.approx(0.55)


def test_a_bad_arm_is_named_before_any_work():
    study = {
        "seeds": [0],
        "models": {
            "good": {"model": {"variant": "R26x1"}},
            "bad": {"model": {"variant": "R26x1", "pool": "gap"}},
        },
        "subsets": {"p10": {"fraction": 0.1, "epochs": 5}},
    }
    with pytest.raises(ValueError, match=r"scaling arm 'bad' \(p10\): unknown BiT model parameters of R26x1"):
        check_study(PRETRAIN, study, "scaling")
    ablations = {"seeds": [0], "arms": {"slow": {"train": {"lr": -1}}}, "subset": {"fraction": 1.0}}
    with pytest.raises(
        ValueError, match=r"ablations arm 'slow' \(subset\): training parameter lr must be > 0"
    ):
        check_study(PRETRAIN, ablations, "ablations")
    with pytest.raises(
        ValueError, match=r"ablations.seeds must be a non-empty list of whole numbers, got \[\]"
    ):
        check_study(PRETRAIN, {**ablations, "seeds": []}, "ablations")
