"""DivPrune: diversity-based visual token pruning (Alvar et al., CVPR 2025).

Keeps the most *diverse* subset of each image's visual tokens: a greedy solution of the Max-Min
Diversity Problem over cosine distance between post-projector embeddings (see
:func:`tokenprune.kernels.mmdp_select`). No attention scores are needed, so it works with any
attention implementation and in vLLM. Paper budget: about 9.8% of LLaVA-1.5's 576 tokens.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence

import torch

from tokenprune.kernels import mmdp_select
from tokenprune.methods.base import ImageTokens, VisualPruner, register


@register("divprune")
@dataclass(frozen=True)
class DivPrune(VisualPruner):
    """Args:
        keep: tokens kept per image (int >= 1) or fraction kept (float in (0, 1]).
        impl: kernel implementation, ``"auto"`` | ``"triton"`` | ``"torch"``.
    """

    keep: int | float = 64
    impl: str = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.impl not in ("auto", "triton", "torch"):
            raise ValueError(f"impl must be 'auto', 'triton' or 'torch', got {self.impl!r}")

    def select(self, image: ImageTokens) -> torch.Tensor:
        return self.select_batch([image])[0]

    def select_batch(self, images: Sequence[ImageTokens]) -> list[torch.Tensor]:
        # One packed kernel launch per distinct budget (a fractional keep gives images of
        # different sizes different budgets).
        groups: dict[int, list[int]] = defaultdict(list)
        for i, image in enumerate(images):
            groups[self.num_kept(image.num_tokens)].append(i)
        result: list[torch.Tensor] = [torch.empty(0, dtype=torch.long)] * len(images)
        for k, members in groups.items():
            if k == 0:
                for i in members:
                    result[i] = torch.empty(0, dtype=torch.long, device=images[i].features.device)
                continue
            feats = [images[i].features for i in members]
            lengths = torch.tensor([0] + [f.shape[0] for f in feats])
            cu = torch.cumsum(lengths, 0).to(feats[0].device)
            picked = mmdp_select(torch.cat(feats, 0), k, cu_seqlens=cu, impl=self.impl)
            offset = 0
            for j, i in enumerate(members):
                count = min(k, feats[j].shape[0])
                result[i] = picked[offset : offset + count] - cu[j]
                offset += count
        return result
