"""Analysis: attention distance on hand-made maps, rollout on known cases, position similarity, components."""

import math

import numpy as np
import pytest
import torch

from vit_pipelines.evaluation.analysis import (
    attention_distances,
    attention_rollout,
    mean_attention_distance,
    patch_embedding_components,
    position_similarity,
    rollout_maps,
)
from vit_pipelines.models import VisionTransformer, ViTConfig


def test_attention_distance_of_hand_made_maps():
    grid, patch = (2, 2), (4, 4)  # patch centres 4 px apart
    to_self = torch.eye(5)[None, None]  # [class] + 4 patches, every token attends to itself only
    assert mean_attention_distance(to_self, grid, patch) == pytest.approx([0.0])
    uniform = torch.full((1, 1, 5, 5), 1 / 5)  # the [class] share is dropped and the rest renormalised
    assert mean_attention_distance(uniform, grid, patch) == pytest.approx(
        [(0 + 4 + 4 + 4 * math.sqrt(2)) / 4]
    )
    right = torch.zeros(
        1, 2, 5, 5
    )  # head 0: each patch attends to its horizontal neighbour; head 1: diagonal
    for query, key in ((1, 2), (2, 1), (3, 4), (4, 3)):
        right[0, 0, query, key] = 1.0
    for query, key in ((1, 4), (4, 1), (2, 3), (3, 2)):
        right[0, 1, query, key] = 1.0
    right[0, :, 0, 0] = 1.0
    assert mean_attention_distance(right, grid, patch) == pytest.approx([4.0, 4 * math.sqrt(2)])


def test_rollout_of_known_cases():
    identity = [torch.eye(4)[None, None].repeat(1, 3, 1, 1)] * 3
    assert torch.allclose(attention_rollout(identity)[0], torch.eye(4, dtype=torch.float64))
    a = torch.softmax(torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(0)), dim=-1)
    one_layer = attention_rollout([a])[0]  # heads averaged, residual added, rows renormalised
    assert torch.allclose(one_layer, (a.double().mean(dim=1)[0] + torch.eye(4, dtype=torch.float64)) / 2)
    uniform = torch.full((1, 1, 4, 4), 0.25)  # M = (U + I) / 2 and U² = U, so M² = (3U + I) / 4
    two = attention_rollout([uniform, uniform])[0]
    assert torch.allclose(two, (3 * torch.full((4, 4), 0.25, dtype=torch.float64) + torch.eye(4)) / 4)
    assert torch.allclose(two.sum(dim=-1), torch.ones(4, dtype=torch.float64))


def tiny_vit(**overrides) -> VisionTransformer:
    torch.manual_seed(0)
    fields = dict(image_size=16, depth=2, width=32, mlp_dim=64, num_heads=2, num_classes=3) | overrides
    return VisionTransformer(ViTConfig.from_variant("Ti/4", **fields)).eval()


def test_sincos_position_embedding_is_most_similar_to_itself_and_its_neighbours():
    similarity = position_similarity(tiny_vit(posemb="sincos2d", image_size=32))  # 8x8 grid
    assert similarity.shape == (8, 8, 8, 8)
    assert np.allclose([similarity[r, c, r, c] for r in range(8) for c in range(8)], 1.0)
    assert similarity[3, 3, 3, 4] > similarity[3, 3, 3, 7] and similarity[3, 3, 4, 3] > similarity[3, 3, 7, 3]
    with pytest.raises(ValueError, match="no position embedding"):
        position_similarity(tiny_vit(posemb="none"))


def test_components_recover_a_planted_filter_pattern():
    model = tiny_vit()
    pattern = torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(1))
    scales = torch.randn(32, 1, 1, 1, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():  # every filter a multiple of one pattern, plus a little noise
        model.patch_embed.proj.weight.copy_(scales * pattern + 1e-4 * torch.randn(32, 3, 4, 4))
    components, variance = patch_embedding_components(model, 5)
    assert components.shape == (5, 4, 4, 3) and components.min() >= 0 and components.max() <= 1
    assert variance[0] > 0.999
    first = torch.as_tensor(components[0]).permute(2, 0, 1).flatten()
    correlation = np.corrcoef(first.numpy(), pattern.flatten().numpy())[0, 1]
    assert abs(correlation) > 0.999  # the component is the pattern (up to sign and display scaling)


@pytest.mark.parametrize("pool", ["tok", "gap"])
def test_rollout_maps_and_distances_have_one_value_per_patch_and_head(pool):
    model = tiny_vit(pool=pool)
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    maps = rollout_maps(model, images)
    assert maps.shape == (3, 4, 4) and (maps > 0).all()
    distances = attention_distances(model, images)
    assert distances.shape == (2, 2) and ((distances > 0) & (distances < 12 * math.sqrt(2))).all()
