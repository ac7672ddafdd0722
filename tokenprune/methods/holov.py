"""HoloV: holistic visual token pruning (Zou et al., NeurIPS 2025, "Don't Just Chase
'Highlighted Tokens' in MLLMs: Revisiting Visual Holistic Context Retention", arXiv 2510.02912).

Instead of a global top-k by attention, the budget is spread over spatial crops of the image:

1. split the tokens into ``crops`` crops;
2. inside a crop, each token's *contextual diversity* ``V`` is the variance of its cosine
   similarities to the other tokens of the crop; its score is
   ``H = 1e3 * a + alpha * V * gamma`` where ``a`` is the vision [CLS] attention the token receives
   and ``gamma = mean|1e3 * a| / mean|V|`` puts both terms on one scale (per crop);
3. a crop's weight is ``mean(H)``; quotas are ``floor(weight share * keep)`` with the remainder going
   one token each to the best crops;
4. each crop keeps its top-quota tokens *by attention*.

Defaults are the public LLaVA code's: 16 crops, ``alpha = 0.09``. Differences from it:
``layout="grid"`` (default) cuts 2-D rectangles of the patch grid (4x4 crops of 6x6 tokens for
LLaVA-1.5) as the paper describes spatial crops, where the public code cuts ``layout="raster"``
chunks of the flattened sequence (1.5 raster rows each); and a quota larger than its crop flows to
the next-best crops instead of being replaced by zero-vector padding, so exactly ``keep`` real tokens
are always kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from tokenprune.methods.base import ImageTokens, VisualPruner, check_number, register, topk_ascending
from tokenprune.methods.spatial import grid_crops, raster_crops, split_budget

_EPS = 1e-6


def crop_token_scores(features: torch.Tensor, attention: torch.Tensor, alpha: float) -> torch.Tensor:
    """HoloV token scores ``H`` ``[n]`` of one crop (``features`` ``[n, D]``, ``attention`` ``[n]``)."""
    n = features.shape[0]
    scaled = attention.float() * 1e3
    if n <= 1:
        return scaled
    f = features.float()
    f = f / (f.norm(dim=1, keepdim=True) + _EPS)
    sim = (f @ f.T) * (1 - torch.eye(n, device=f.device))
    # As the public code: the zeroed diagonal stays in the sums, normalised by n - 1.
    mean = sim.sum(dim=1) / (n - 1)
    var = ((sim - mean[:, None]) ** 2).sum(dim=1) / (n - 1)
    gamma = scaled.abs().mean() / (var.abs().mean() + _EPS)
    return scaled + alpha * var * gamma


@register("holov")
@dataclass(frozen=True)
class HoloV(VisualPruner):
    """Args:
        keep: tokens kept per image (int >= 1) or fraction kept (float in (0, 1]).
        crops: number of spatial crops per image (16 in the paper for 576 tokens).
        alpha: weight of the contextual-diversity term (0.09).
        layout: ``"grid"`` (2-D crops of the patch grid) or ``"raster"`` (contiguous chunks of the
            token sequence, the public code). Images without a grid layout always use ``"raster"``.
    """

    requires: ClassVar[frozenset[str]] = frozenset({"cls_attention"})

    keep: int | float = 64
    crops: int = 16
    alpha: float = 0.09
    layout: str = "grid"

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.crops, bool) or not isinstance(self.crops, int):
            raise TypeError(f"crops must be an int, got {type(self.crops).__name__}")
        if self.crops < 1:
            raise ValueError(f"crops must be >= 1, got {self.crops}")
        check_number("alpha", self.alpha, 0.0, math.inf)
        if self.layout not in ("grid", "raster"):
            raise ValueError(f"layout must be 'grid' or 'raster', got {self.layout!r}")

    def crop_indices(self, image: ImageTokens) -> list[torch.Tensor]:
        blocks = image.spatial_blocks()
        if self.layout == "grid" and blocks is not None:
            return grid_crops(blocks, self.crops, image.num_tokens)
        return raster_crops(image.num_tokens, self.crops)

    def select(self, image: ImageTokens) -> torch.Tensor:
        attention = image.require("cls_attention", type(self).__name__).float()
        n = image.num_tokens
        k = self.num_kept(n)
        device = image.features.device
        if k >= n:
            return torch.arange(n, device=device)
        crops = [c.to(device) for c in self.crop_indices(image)]
        weights = [
            float(crop_token_scores(image.features[c], attention[c], self.alpha).mean()) for c in crops
        ]
        quotas = split_budget(k, weights, [c.numel() for c in crops])
        kept = [c[topk_ascending(attention[c], q)] for c, q in zip(crops, quotas) if q > 0]
        return torch.sort(torch.cat(kept)).values
