"""Training objectives: DRLoc (targets, sampling, the loss on known grids, every ViT variant, logging and resume)
and masked patch prediction (corruption proportions, 3-bit colour targets, training then fine-tuning)."""

import numpy as np
import pytest
import torch
from test_training import assert_same_weights, config, tiny_cache, tiny_model
from torch import nn

from vit_pipelines.models import VisionTransformer
from vit_pipelines.models.surgery import for_finetuning
from vit_pipelines.training import TrainConfig, train
from vit_pipelines.training.objectives import (
    MASKED_PATCH_CLASSES,
    Classification,
    DRLoc,
    DRLocConfig,
    MaskedPatchPrediction,
    build_objective,
    corrupt_patches,
    mean_colour_classes,
    relative_offsets,
    sample_position_pairs,
)
from vit_pipelines.training.saving import latest_training_state

# ---------------------------------------------------------------- DRLoc


def test_relative_offsets_on_a_known_grid():
    rows, columns = 3, 4  # flat position = row * 4 + column
    first = torch.tensor([[0, 11, 5, 7]])  # (0,0) (2,3) (1,1) (1,3)
    second = torch.tensor([[11, 0, 5, 4]])  # (2,3) (0,0) (1,1) (1,0)
    targets = relative_offsets(torch.stack([first, second]), rows, columns)
    expected = [[[2 / 3, 3 / 4], [2 / 3, 3 / 4], [0, 0], [0, 3 / 4]]]
    torch.testing.assert_close(targets, torch.tensor(expected))


def test_pairs_are_uniform_over_the_grid_and_independent():
    torch.manual_seed(0)
    rows, columns, cells = 3, 4, 12
    positions = sample_position_pairs(500, rows, columns, 64)  # 32,000 pairs
    assert positions.shape == (2, 500, 64) and positions.min() == 0 and positions.max() == cells - 1
    first, second = positions.reshape(2, -1)
    counts = torch.bincount(first, minlength=cells).double()
    expected = first.numel() / cells
    # chi-square with 11 degrees of freedom: 31.3 is its 0.999 quantile
    assert ((counts - expected) ** 2 / expected).sum() < 31.3
    joint = torch.bincount(first * cells + second, minlength=cells * cells).double()
    expected = first.numel() / cells**2  # 143 degrees of freedom: 0.999 quantile 199.4
    assert ((joint - expected) ** 2 / expected).sum() < 199.4
    # the mean target over uniform pairs: E|i - p| / rows = (rows² - 1) / (3 rows²) per axis
    mean = relative_offsets(positions, rows, columns).mean(dim=(0, 1))
    torch.testing.assert_close(mean, torch.tensor([8 / 27, 15 / 48]), atol=4e-3, rtol=0)


def exact_offset_drloc(pool_grid=None) -> DRLoc:
    """A DRLoc whose MLP computes (|a_u - b_u|, |a_v - b_v|) exactly for 2-d tokens (u, v): |x| = relu(x) +
    relu(-x)."""
    drloc = DRLoc(2, DRLocConfig(pairs=64, mlp_dim=4, pool_grid=pool_grid))
    first, _, second, _, third = drloc.mlp
    with torch.no_grad():
        first.weight.copy_(torch.tensor([[1, 0, -1, 0], [-1, 0, 1, 0], [0, 1, 0, -1], [0, -1, 0, 1.0]]))
        second.weight.copy_(torch.eye(4))
        third.weight.copy_(torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1.0]]))
        for layer in (first, second, third):
            layer.bias.zero_()
    return drloc


def coordinate_grid(batch: int, rows: int, columns: int) -> torch.Tensor:
    """`[B, rows, columns, 2]` tokens holding their own normalised position (i / rows, j / columns)."""
    i, j = torch.meshgrid(torch.arange(rows) / rows, torch.arange(columns) / columns, indexing="ij")
    return torch.stack([i, j], dim=-1).expand(batch, -1, -1, -1)


def test_drloc_loss_is_zero_for_the_exact_predictor_and_the_mean_offset_for_a_zero_one():
    torch.manual_seed(0)
    grid = coordinate_grid(8, 5, 7)
    assert exact_offset_drloc()(grid).item() == pytest.approx(0.0, abs=1e-6)
    zero = exact_offset_drloc()
    torch.nn.init.zeros_(zero.mlp[-1].weight)  # predicts (0, 0): the loss is the mean |offset| sum
    expected = (25 - 1) / (3 * 25) + (49 - 1) / (3 * 49)
    assert zero(coordinate_grid(64, 5, 7)).item() == pytest.approx(expected, abs=0.01)


def test_pooling_averages_the_grid_to_the_configured_size():
    torch.manual_seed(0)
    # an 8x8 grid of 2x2 blocks, each holding its block's position (p / 4, q / 4): pooled to 4x4 the tokens
    # are exactly the 4x4 coordinate grid, so the exact predictor's loss is zero; unpooled it is not
    blocks = coordinate_grid(4, 4, 4).repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)
    assert exact_offset_drloc(pool_grid=4)(blocks).item() == pytest.approx(0.0, abs=1e-6)
    assert exact_offset_drloc()(blocks).item() > 0.05
    # a grid already within the limit is left as it is
    assert exact_offset_drloc(pool_grid=9)(coordinate_grid(4, 8, 8)).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(pool="tok", posemb="learn"),
        dict(pool="gap", posemb="sincos2d"),
        dict(pool="tok", posemb="learn2d", image_size=(8, 12)),
        dict(pool="gap", posemb="learn", hybrid="R_tiny", patch_size=8, image_size=32),
    ],
    ids=["tok-learn", "gap-sincos", "non-square-learn2d", "hybrid"],
)
def test_drloc_works_for_every_variant_and_trains_its_mlp_and_the_encoder(overrides):
    model = tiny_model(**overrides)
    objective = Classification(model, drloc=DRLocConfig(pairs=16, weight=0.5, mlp_dim=32))
    images = torch.randn(4, 3, *model.config.image_size)
    out = objective(images, torch.tensor([0, 1, 2, 0]))
    assert set(out.terms) == {"classification_loss", "drloc_loss"}
    total = out.terms["classification_loss"] + 0.5 * out.terms["drloc_loss"]
    torch.testing.assert_close(out.loss.detach(), total)
    out.loss.backward()
    assert objective.drloc.mlp[0].weight.grad.abs().sum() > 0
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_drloc_is_logged_beside_the_classification_loss_and_resumes_exactly(tmp_path):
    cache = tiny_cache()
    drloc = dict(pairs=8, weight=0.3, mlp_dim=16)
    run = TrainConfig.from_params({**vars_of(config(steps=8, checkpoint_every=3)), "drloc": drloc})
    assert run.drloc == DRLocConfig(pairs=8, weight=0.3, mlp_dim=16)
    straight = train(tiny_model(dropout=0.1), cache, run)
    logs = [r for r in straight.history if "loss" in r]
    for record in logs:  # the logged total is the logged cross-entropy + λ · the logged DRLoc loss
        assert record["loss"] == pytest.approx(record["classification_loss"] + 0.3 * record["drloc_loss"])
        assert 0 < record["drloc_loss"] < 2
    killed = train(tiny_model(dropout=0.1), cache, run, checkpoint_dir=tmp_path, stop_after=5)
    assert killed.resumed_from_step == 0
    assert (latest_training_state(next(tmp_path.iterdir())) / "objective.safetensors").exists()
    resumed = train(tiny_model(seed=123, dropout=0.1), cache, run, checkpoint_dir=tmp_path)
    assert resumed.resumed_from_step == 3
    assert_same_weights(straight.model, resumed.model)
    # the DRLoc MLP was restored too: the logged losses match the uninterrupted run's (the windows after
    # step 4; the one ending at 4 covers step 4 alone after the resume)
    after = [r for r in resumed.history if "loss" in r and r["step"] > 4]
    for a, b in zip(after, [r for r in logs if r["step"] > 4], strict=True):
        assert a["drloc_loss"] == pytest.approx(b["drloc_loss"], rel=1e-5)


def vars_of(run: TrainConfig) -> dict:
    return {k: v for k, v in vars(run).items() if v is not None and k != "drloc"}


def test_drloc_and_objective_parameters_are_checked():
    with pytest.raises(ValueError, match="unknown drloc parameters.*pair"):
        TrainConfig.from_params({**vars_of(config()), "drloc": {"pair": 3}})
    with pytest.raises(ValueError, match="objective must be one of"):
        build_objective(tiny_model(), "contrastive")
    with pytest.raises(ValueError, match="masked_patch takes no drloc"):
        build_objective(tiny_model(num_classes=512), "masked_patch", drloc=DRLocConfig())
    with pytest.raises(ValueError, match="needs a model with 512 classes"):
        MaskedPatchPrediction(tiny_model())


# ---------------------------------------------------------------- masked patch prediction


def test_corruption_proportions_over_many_draws():
    torch.manual_seed(0)
    b, n, d = 256, 64, 8
    tokens = torch.randn(b, n, d)
    mask_token = torch.full((1, 1, d), 7.0)
    out, chosen, masked, randomised = corrupt_patches(tokens, mask_token)
    assert (chosen.sum(1) == 32).all()  # exactly half of every image
    assert not (masked & randomised).any() and not ((masked | randomised) & ~chosen).any()
    kept = chosen & ~masked & ~randomised
    total = chosen.sum().item()  # 8,192 corrupted patches: binomial std of a 10% share ≈ 0.0033
    assert masked.sum().item() / total == pytest.approx(0.8, abs=0.015)
    assert randomised.sum().item() / total == pytest.approx(0.1, abs=0.012)
    assert kept.sum().item() / total == pytest.approx(0.1, abs=0.012)
    assert (out[masked] == 7.0).all()
    torch.testing.assert_close(out[~masked & ~randomised], tokens[~masked & ~randomised])
    # a random patch embedding of the batch: every replacement is one of the original tokens
    pool = tokens.reshape(-1, d)
    replaced = out[randomised]
    assert (replaced[:, None, :] == pool[None]).all(-1).any(1).all()
    assert (replaced != tokens[randomised]).any(-1).float().mean() > 0.99  # another patch, almost surely
    # the positions are spread uniformly: every position is chosen about half the time
    assert chosen.float().mean(0).sub(0.5).abs().max() < 0.12


def test_mean_colour_classes_of_known_patches():
    patch = 4
    colours = torch.tensor(  # per patch (r, g, b) in [0, 1], one 2x3 grid of patches
        [
            [[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.5, 0.25, 0.125]],
            [[0.99, 0.0, 0.3], [0.12, 0.13, 0.14], [0, 0, 0.9]],
        ]
    )
    images = colours.permute(2, 0, 1).repeat_interleave(patch, 1).repeat_interleave(patch, 2)[None] * 2 - 1
    classes = mean_colour_classes(images, (patch, patch))
    bins = np.minimum(np.floor(colours.numpy() * 8), 7).astype(int)
    expected = bins[..., 0] * 64 + bins[..., 1] * 8 + bins[..., 2]
    assert classes.tolist() == [expected.tolist()]
    assert classes[0, 0, 0] == 0 and classes[0, 0, 1] == 511 and classes[0, 0, 2] == 4 * 64 + 2 * 8 + 1
    # the MEAN colour: half black, half white averages to mid-grey, bin 4 in every channel
    half = torch.cat([-torch.ones(1, 3, 4, 2), torch.ones(1, 3, 4, 2)], dim=3)
    assert mean_colour_classes(half, (4, 4)).item() == (4 * 8 + 4) * 8 + 4
    assert MASKED_PATCH_CLASSES == 512


def colour_cache(n: int = 64, seed: int = 0):
    """Images of 2x2 blocks of flat colours from an 8-colour palette: a corrupted patch's colour is learnable
    from its visible neighbours in the block."""
    import datasets

    rng = np.random.default_rng(seed)
    palette = rng.integers(0, 256, (8, 3), dtype=np.uint8)
    images = (
        palette[rng.integers(0, 8, (n, 2, 2))].repeat(4, 1).repeat(4, 2)
    )  # 8x8: each block is 2x2 patches
    features = datasets.Features(image=datasets.Array3D((8, 8, 3), "uint8"), label=datasets.Value("int64"))
    return datasets.Dataset.from_dict({"image": images, "label": np.zeros(n, int)}, features=features)


def test_masked_patch_prediction_learns_colours_then_fine_tunes_as_usual(tmp_path):
    from vit_pipelines.evaluation.classification import objective_accuracy

    cache = colour_cache()
    model = tiny_model(num_classes=MASKED_PATCH_CLASSES, patch_size=2)
    run = config(
        steps=100,
        lr=1e-2,
        weight_decay=0.0,
        objective="masked_patch",
        pp_train="value_range(-1,1)",
        log_every=10,
    )
    objective = build_objective(model, "masked_patch")
    before = objective_accuracy(objective, cache, "value_range(-1,1)", 64)
    result = train(model, cache, run, objective=objective)
    logs = [r for r in result.history if "loss" in r]
    assert logs[-1]["loss"] < logs[0]["loss"] - 2.0  # from ≈ ln 512 = 6.2
    after = objective_accuracy(objective, cache, "value_range(-1,1)", 64)
    assert before < 0.05 and after > 0.2  # chance: 1/512 over all colours, 1/8 over the palette
    # then fine-tuning as usual: a new head for the labels, the encoder kept
    tuned = for_finetuning(result.model, 8, 3)
    assert isinstance(tuned, VisionTransformer) and tuned.config.num_classes == 3
    torch.testing.assert_close(tuned.blocks[0].attn.qkv.weight, result.model.blocks[0].attn.qkv.weight)
    train(tuned, tiny_cache(), config(steps=2))


def test_the_mask_token_is_not_weight_decayed_and_resumes(tmp_path):
    from vit_pipelines.training.optim import param_groups

    objective = build_objective(tiny_model(num_classes=512), "masked_patch")
    decay, no_decay = param_groups(objective, 0.1)
    assert any(p is objective.mask_token for p in no_decay["params"])
    assert not any(p is objective.mask_token for p in decay["params"])
    cache = colour_cache(32)
    run = config(steps=6, checkpoint_every=3, objective="masked_patch", pp_train="value_range(-1,1)")
    straight = build_objective(tiny_model(num_classes=512), "masked_patch")
    train(straight.model, cache, run, objective=straight)
    train(tiny_model(num_classes=512), cache, run, checkpoint_dir=tmp_path, stop_after=4)
    resumed = build_objective(tiny_model(seed=5, num_classes=512), "masked_patch")
    train(resumed.model, cache, run, checkpoint_dir=tmp_path, objective=resumed)
    torch.testing.assert_close(resumed.mask_token, straight.mask_token, atol=1e-6, rtol=1e-6)
    assert isinstance(resumed.mask_token, nn.Parameter)
