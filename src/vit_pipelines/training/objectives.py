"""What the training loop minimises for a batch: supervised classification, with the optional DRLoc auxiliary
loss (seed 002, arXiv 2106.03746), or self-supervised masked patch prediction (paper §4.6, App. B.1.2).

An objective is an `nn.Module` holding the ViT as `.model` beside its own trained parameters (DRLoc's MLP, the
[mask] token), so Accelerate / DDP wrap, place and synchronise them together. Every draw (DRLoc's pairs, the
corrupted patches) uses the global RNG, which the loop seeds from the step: a resumed run draws the same, and
every shape is static (XLA-friendly).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from vit_pipelines.models.vit import VisionTransformer
from vit_pipelines.training.losses import classification_loss

OBJECTIVES = ("classification", "masked_patch")
COLOUR_BITS = 3  # App. B.1.2: the 3-bit mean colour of a patch, 2^(3*3) = 512 classes
MASKED_PATCH_CLASSES = 2 ** (3 * COLOUR_BITS)


@dataclass
class StepOutput:
    """`loss` to minimise; per-example `correct` predictions out of `count` (one label per image for
    classification, the corrupted patches for masked patch prediction); named scalar loss `terms` to log."""

    loss: torch.Tensor
    correct: torch.Tensor
    count: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class DRLocConfig:
    """DRLoc as its paper sets it up: m pairs per image, weight λ, MLP 2D→mlp_dim→mlp_dim→2 (ReLU).
    `pool_grid` average-pools the final token grid to at most that many rows and columns first (the paper
    pools grids larger than 7x7); None keeps the grid."""

    pairs: int = 64
    weight: float = 0.1
    mlp_dim: int = 512
    pool_grid: int | None = None

    def __post_init__(self) -> None:
        if self.pairs < 1 or self.mlp_dim < 1 or (self.pool_grid is not None and self.pool_grid < 1):
            raise ValueError(f"DRLoc pairs, mlp_dim and pool_grid must be positive, got {self}")


def sample_position_pairs(
    batch: int, rows: int, columns: int, pairs: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """`[2, batch, pairs]` flat grid positions (row * columns + column), each drawn uniformly and independently."""
    return torch.randint(0, rows * columns, (2, batch, pairs), device=device)


def relative_offsets(positions: torch.Tensor, rows: int, columns: int) -> torch.Tensor:
    """DRLoc's targets `[..., 2]` for `positions` `[2, ...]` from `sample_position_pairs`: for (i, j) and
    (p, h), (|i - p| / rows, |j - h| / columns) in [0, 1)²."""
    first, second = positions
    du = (first.div(columns, rounding_mode="floor") - second.div(columns, rounding_mode="floor")).abs() / rows
    dv = (first % columns - second % columns).abs() / columns
    return torch.stack([du, dv], dim=-1).float()


class DRLoc(nn.Module):
    """Dense relative localization: from the pair of embeddings at two sampled positions of the final patch
    grid, an MLP predicts their normalised offset; L1 (summed over the two coordinates, averaged over pairs)."""

    def __init__(self, width: int, config: DRLocConfig) -> None:
        super().__init__()
        self.config = config
        self.mlp = nn.Sequential(
            nn.Linear(2 * width, config.mlp_dim),
            nn.ReLU(),
            nn.Linear(config.mlp_dim, config.mlp_dim),
            nn.ReLU(),
            nn.Linear(config.mlp_dim, 2),
        )

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        """`grid` `[B, rows, columns, D]` (class token excluded) → the scalar DRLoc loss."""
        if self.config.pool_grid is not None:
            size = (min(grid.shape[1], self.config.pool_grid), min(grid.shape[2], self.config.pool_grid))
            grid = F.adaptive_avg_pool2d(grid.permute(0, 3, 1, 2), size).permute(0, 2, 3, 1)
        b, rows, columns, d = grid.shape
        positions = sample_position_pairs(b, rows, columns, self.config.pairs, grid.device)
        tokens = grid.reshape(b, rows * columns, d)
        first, second = (tokens.gather(1, p.unsqueeze(-1).expand(-1, -1, d)) for p in positions)
        predicted = self.mlp(torch.cat([first, second], dim=-1)).float()
        return (predicted - relative_offsets(positions, rows, columns)).abs().sum(-1).mean()


class Classification(nn.Module):
    """Cross-entropy on the labels (`loss`: softmax or sigmoid), plus λ·DRLoc when `drloc` is given."""

    def __init__(
        self,
        model: VisionTransformer,
        loss: str = "softmax",
        label_smoothing: float = 0.0,
        drloc: DRLocConfig | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.loss, self.label_smoothing = loss, label_smoothing
        self.drloc = DRLoc(model.config.width, drloc) if drloc is not None else None
        self.terms = ("classification_loss", "drloc_loss") if drloc is not None else ()

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> StepOutput:
        features = self.model.forward_features(images, tokens=self.drloc is not None)
        logits = self.model.head(features["pre_logits"])
        loss = classification_loss(logits, labels, self.loss, self.label_smoothing)
        correct = logits.argmax(-1) == labels
        out = StepOutput(loss, correct, torch.ones_like(correct, dtype=torch.long))
        if self.drloc is not None:
            drloc = self.drloc(self.model.patch_tokens(features))
            out.loss = loss + self.drloc.config.weight * drloc
            out.terms = {"classification_loss": loss.detach(), "drloc_loss": drloc.detach()}
        return out


def mean_colour_classes(
    images: torch.Tensor, patch_size: tuple[int, int], bits: int = COLOUR_BITS
) -> torch.Tensor:
    """`[B, rows, columns]` class of each patch's mean colour: every channel of `images` `[B, 3, H, W]` (in
    [-1, 1]) averaged over the patch and quantised to `bits` bits, then (r, g, b) read as one base-2^bits
    number (r most significant)."""
    levels = 2**bits
    mean = F.avg_pool2d(images.float(), patch_size, patch_size)
    quantised = ((mean + 1) / 2 * levels).floor().clamp(0, levels - 1).long()
    r, g, b = quantised.unbind(1)
    return (r * levels + g) * levels + b


def corrupt_patches(
    tokens: torch.Tensor,
    mask_token: torch.Tensor,
    fraction: float = 0.5,
    mask_probability: float = 0.8,
    random_probability: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Corrupt `round(fraction * N)` patch embeddings of every image in `tokens` `[B, N, D]`: each becomes the
    [mask] token with `mask_probability`, a random patch embedding of the batch with `random_probability`, or
    stays as it is. Returns (tokens, chosen, masked, randomised), the last three boolean `[B, N]`."""
    b, n, _ = tokens.shape
    order = torch.rand(b, n, device=tokens.device).argsort(dim=1).argsort(dim=1)
    chosen = order < max(1, round(fraction * n))  # exactly that many per image: a static shape
    u = torch.rand(b, n, device=tokens.device)
    masked = chosen & (u < mask_probability)
    randomised = chosen & (u >= mask_probability) & (u < mask_probability + random_probability)
    others = tokens.reshape(b * n, -1)[torch.randint(0, b * n, (b, n), device=tokens.device)]
    out = torch.where(masked.unsqueeze(-1), mask_token.to(tokens.dtype), tokens)
    out = torch.where(randomised.unsqueeze(-1), others, out)
    return out, chosen, masked, randomised


class MaskedPatchPrediction(nn.Module):
    """Self-supervised: corrupt half the patch embeddings (80% [mask], 10% another patch, 10% kept) and predict
    each corrupted patch's 3-bit mean colour from its final token, through the model's own pre-logits and head
    (built with `MASKED_PATCH_CLASSES` classes), so the pretrained checkpoint is a plain ViT to fine-tune."""

    def __init__(self, model: VisionTransformer, fraction: float = 0.5) -> None:
        super().__init__()
        if model.config.num_classes != MASKED_PATCH_CLASSES:
            raise ValueError(
                f"masked patch prediction needs a model with {MASKED_PATCH_CLASSES} classes (3-bit colours), "
                f"got {model.config.num_classes}"
            )
        self.model, self.fraction = model, fraction
        self.mask_token = nn.Parameter(torch.empty(1, 1, model.config.width).normal_(std=0.02))
        self.terms = ()

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> StepOutput:
        targets = mean_colour_classes(images, self.model.config.patch_size).flatten(1)
        tokens, chosen, _, _ = corrupt_patches(self.model.patch_embed(images), self.mask_token, self.fraction)
        patches = self.model.patch_tokens(self.model.encode(tokens)).flatten(1, 2)
        logits = self.model.head(self.model.pre_logits(patches)).float()
        per_patch = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
        weights = chosen.float()
        loss = (per_patch * weights).sum() / weights.sum()
        correct = ((logits.argmax(-1) == targets) & chosen).sum(1)
        return StepOutput(loss, correct, chosen.sum(1))


def build_objective(
    model: VisionTransformer,
    objective: str = "classification",
    loss: str = "softmax",
    label_smoothing: float = 0.0,
    drloc: DRLocConfig | None = None,
) -> Classification | MaskedPatchPrediction:
    """The objective named in the training parameters (`objective`, `drloc` of `TrainConfig`)."""
    if objective == "classification":
        return Classification(model, loss, label_smoothing, drloc)
    if objective == "masked_patch":
        if drloc is not None:
            raise ValueError("DRLoc is an auxiliary loss of classification; masked_patch takes no drloc")
        return MaskedPatchPrediction(model)
    raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
