"""Fine-tuning: the dev split, the LR choice, head and posemb surgery, the paper's optimiser, resumable runs."""

from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
import yaml
from torch import nn

from vit_pipelines.data.cache import split_minival
from vit_pipelines.evaluation.finetune import best_lr, dev_accuracies, finetune_and_test
from vit_pipelines.models import VisionTransformer, ViTConfig, resize_pos_embed
from vit_pipelines.models.surgery import for_finetuning
from vit_pipelines.training import TrainConfig
from vit_pipelines.training.optim import build_optimizer

ROOT = Path(__file__).resolve().parents[1]
PARAMS = yaml.safe_load((ROOT / "conf" / "base" / "parameters_finetune.yml").read_text())["finetune"]


def labelled(counts: list[int], size: int = 8, seed: int = 0) -> datasets.Dataset:
    """`counts[k]` images of class k whose brightest channel is k % 3 (learnable), with a unique `id` each."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(counts)), counts)
    images = rng.integers(0, 60, (len(labels), size, size, 3), dtype=np.uint8)
    images[np.arange(len(labels)), :, :, labels % 3] += 150
    features = datasets.Features(
        image=datasets.Array3D((size, size, 3), "uint8"),
        label=datasets.ClassLabel(num_classes=len(counts)),
        id=datasets.Value("int64"),
    )
    return datasets.Dataset.from_dict(
        {"image": images, "label": labels, "id": np.arange(len(labels))}, features=features
    )


def pretrained(seed: int = 0, **overrides) -> VisionTransformer:
    torch.manual_seed(seed)
    fields = dict(depth=1, width=32, mlp_dim=64, num_heads=2, representation_size=16) | overrides
    model = VisionTransformer(ViTConfig.from_variant("Ti/4", image_size=8, num_classes=7, **fields))
    nn.init.normal_(model.head.weight, std=0.1)  # a trained pretraining head, which fine-tuning throws away
    nn.init.normal_(model.head.bias, std=0.1)
    return model


def test_dev_split_is_stratified_disjoint_and_seeded():
    counts = [100, 50, 30, 20, 60, 40]
    data = labelled(counts)
    train, dev = split_minival(data, PARAMS["dev_fraction"], seed=0)
    assert len(dev) == 30 and len(train) == 270
    assert Counter(dev["label"]) == {k: n // 10 for k, n in enumerate(counts)}  # 10% of every class
    assert set(train["id"]).isdisjoint(dev["id"]) and len(set(train["id"]) | set(dev["id"])) == len(data)
    assert split_minival(data, 0.1, seed=0)[1]["id"] == dev["id"]
    assert split_minival(data, 0.1, seed=1)[1]["id"] != dev["id"]
    assert len(split_minival(labelled([50] * 10), 0.02)[1]) == 10  # the paper's 2%: one per class here


def test_best_lr_takes_the_highest_dev_accuracy_and_the_smaller_lr_on_ties():
    assert best_lr({0.003: 0.7, 0.01: 0.9, 0.03: 0.8}) == 0.01
    assert best_lr({0.03: 0.9, 0.01: 0.8, 0.003: 0.9}) == 0.003
    assert best_lr({0.01: 0.5}) == 0.01
    with pytest.raises(ValueError, match="no learning rate"):
        best_lr({})


@pytest.mark.parametrize("num_classes", [5, 7])  # 7 = the pretraining head's: it is replaced all the same
def test_for_finetuning_puts_one_zero_head_and_resizes_the_posemb(num_classes):
    source = pretrained()
    before = {k: v.clone() for k, v in source.state_dict().items()}
    model = for_finetuning(source, image_size=12, num_classes=num_classes)
    assert model.config.image_size == (12, 12) and model.config.grid_size == (3, 3)
    assert model.config.representation_size is None and isinstance(model.pre_logits, nn.Identity)
    assert model.head.weight.shape == (num_classes, 32)
    assert not model.head.weight.any() and not model.head.bias.any()
    expected = resize_pos_embed(before["pos_embed"], (3, 3), 1, (2, 2), "zoom_bilinear")
    assert model.pos_embed.shape == (1, 1 + 9, 32)
    torch.testing.assert_close(model.pos_embed, expected)
    torch.testing.assert_close(model.pos_embed[:, 0], before["pos_embed"][:, 0])  # the class token's slot
    for name, value in model.state_dict().items():
        if not name.startswith(("head.", "pos_embed")):
            assert torch.equal(value, before[name]), name
    assert all(torch.equal(v, before[k]) for k, v in source.state_dict().items())  # the source is untouched
    logits = model.eval()(torch.randn(2, 3, 12, 12))
    assert logits.shape == (2, num_classes) and not logits.any()  # a zero head starts at uniform


def test_finetuning_optimiser_is_the_papers_sgd_without_weight_decay():
    config = TrainConfig.from_params({**PARAMS["train"], "lr": PARAMS["lr_grid"][0]})
    model = for_finetuning(pretrained(), PARAMS["image_size"], 10)
    optimizer = build_optimizer(
        model, config.optimizer, config.lr, config.weight_decay, config.betas, config.momentum
    )
    assert isinstance(optimizer, torch.optim.SGD)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.0, 0.0]
    assert all(g["momentum"] == 0.9 and g["lr"] == PARAMS["lr_grid"][0] for g in optimizer.param_groups)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))
    assert config.grad_clip == 1.0 and config.decay == "cosine" and 0 < config.warmup_steps < config.steps
    assert config.ema_decay is not None and 0 < config.ema_decay < 1


def test_finetune_runs_resume_and_are_kept_apart_per_start_weights_and_data(tmp_path):
    train, test = labelled([24, 24, 24]), labelled([10, 10, 10], seed=1)
    model = for_finetuning(pretrained(), 8, 3)
    config = TrainConfig(
        steps=4, batch_size=8, lr=0.05, optimizer="sgd", warmup_steps=1, ema_decay=0.5, log_every=2,
        eval_every=2, checkpoint_every=2, mixed_precision="no",
    )  # fmt: skip
    pp = "value_range(-1,1)"
    run, scores = finetune_and_test(model, train, test, config, pp, 64, tmp_path)
    assert run.ema_model is not None and 0 <= scores["test_accuracy_ema"] <= 1
    assert [r["step"] for r in run.history if "test_accuracy" in r] == [2, 4]
    assert scores["test_accuracy"] == run.history[-1]["test_accuracy"]
    assert not model.head.weight.any()  # the caller's model is not trained in place
    again, same = finetune_and_test(model, train, test, config, pp, 64, tmp_path)
    assert again.resumed_from_step == 4 and same == scores
    dev = dev_accuracies(for_finetuning(pretrained(seed=1), 8, 3), train, test, [config], pp, 64, tmp_path)
    assert list(dev) == [0.05] and 0 <= dev[0.05] <= 1
    assert len(list(tmp_path.iterdir())) == 2  # other start weights: a run of their own
