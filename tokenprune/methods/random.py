"""RandomPrune: keep a uniformly random subset of each image's visual tokens.

The floor every method has to beat: UniPruneBench (arXiv 2511.02650) finds random pruning a
surprisingly strong baseline. The draw depends only on ``seed`` and the image's token count, never
on the image's place in the batch, so a row gives the same selection alone or batched.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenprune.methods.base import ImageTokens, VisualPruner, check_int, register


@register("random")
@dataclass(frozen=True)
class RandomPrune(VisualPruner):
    """Args:
        keep: tokens kept per image (int >= 1) or fraction kept (float in (0, 1]).
        seed: seed of the per-image draw (a fresh ``torch.Generator`` per image).
    """

    keep: int | float = 64
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("seed", self.seed, 0, 2**64 - 1)  # torch.Generator.manual_seed's range

    def select(self, image: ImageTokens) -> torch.Tensor:
        n = image.num_tokens
        gen = torch.Generator().manual_seed(self.seed)
        picked = torch.randperm(n, generator=gen)[: self.num_kept(n)]
        return torch.sort(picked).values.to(image.features.device)
