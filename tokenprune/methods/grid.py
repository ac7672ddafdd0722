"""UniformGrid: keep visual tokens on an even spatial lattice of each image's patch grid.

The content-blind baseline beside :class:`~tokenprune.methods.random.RandomPrune`, close to the
image downsampling that VTC-Bench (arXiv 2510.07143) finds hard to beat. An image made of several
grids (LLaVA-NeXT: base image + high-resolution grid) splits the budget over its grids in proportion
to their sizes; tokens without a grid layout are sampled evenly along the sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenprune.methods.base import ImageTokens, VisualPruner, register
from tokenprune.methods.spatial import split_budget, uniform_grid_points


@register("grid")
@dataclass(frozen=True)
class UniformGrid(VisualPruner):
    """Args:
        keep: tokens kept per image (int >= 1) or fraction kept (float in (0, 1]).
    """

    keep: int | float = 64

    def select(self, image: ImageTokens) -> torch.Tensor:
        n = image.num_tokens
        k = self.num_kept(n)
        blocks = image.spatial_blocks()
        if blocks is None:
            picked = torch.tensor([int((i + 0.5) * n / k) for i in range(k)], dtype=torch.long)
        else:
            sizes = [rows * cols for _, rows, cols in blocks]
            quotas = split_budget(k, sizes, sizes)
            picked = torch.cat(
                [start + uniform_grid_points(rows, cols, q) for (start, rows, cols), q in zip(blocks, quotas)]
            )
        return torch.sort(picked).values.to(image.features.device)
