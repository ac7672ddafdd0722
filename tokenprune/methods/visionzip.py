"""VisionZip: dominant + contextual visual tokens (Yang et al., CVPR 2025, "VisionZip: Longer is
Better but Not Necessary in Vision Language Models").

* **Dominant** tokens: the ``dominant`` tokens the vision [CLS] token attends to most at the feature
  layer (ties to the lowest index).
* **Contextual** tokens: among the remaining tokens (in order), ``contextual`` *targets* are taken
  at a uniform stride (``arange(0, R, max(1, R // contextual))[:contextual]``); every other remaining
  token joins the target whose key is most similar (cosine of the feature layer's keys averaged
  over heads); a target's embedding becomes ``target + mean(its members)``.

The split follows the paper's 54 + 10 of 64 (108 + 20, 162 + 30): ``contextual = round(keep * 10 / 64)``.
Each contextual token takes its target's place in the sequence, so the kept indices stay ascending
and every kept token keeps a real position; the public code appends the contextual tokens after the
dominant ones. Unlike the public code, the merge acts on the embeddings the decoder reads (after
the projector) and no [CLS] token is kept (LLaVA's ``default`` feature strategy drops it), so all
``dominant`` tokens are patches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch

from tokenprune.methods.base import ImageTokens, VisualPruner, register, topk_ascending


@dataclass
class _Split:
    dominant: torch.Tensor  # ascending token indices
    targets: torch.Tensor  # ascending token indices
    assignment: torch.Tensor  # [R - contextual] target slot of each merged token
    merged: torch.Tensor  # [R - contextual] token indices merged into targets


@register("visionzip")
@dataclass(frozen=True)
class VisionZip(VisualPruner):
    """Args:
        keep: tokens kept per image (int >= 1) or fraction kept (float in (0, 1]).
        contextual_ratio: share of the budget given to contextual (merged) tokens, 10/64.
    """

    requires: ClassVar[frozenset[str]] = frozenset({"cls_attention", "keys"})

    keep: int | float = 64
    contextual_ratio: float = 10 / 64

    def __post_init__(self) -> None:
        super().__post_init__()
        r = self.contextual_ratio
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 <= r < 1.0:
            raise ValueError(f"contextual_ratio must be a number in [0, 1), got {r!r}")

    def counts(self, n: int) -> tuple[int, int]:
        """``(dominant, contextual)`` token counts for an image of ``n`` tokens."""
        k = self.num_kept(n)
        contextual = min(int(round(k * self.contextual_ratio)), k - 1) if k < n else 0
        return k - contextual, contextual

    def split(self, image: ImageTokens) -> _Split:
        attention = image.require("cls_attention", type(self).__name__).float()
        n = image.num_tokens
        device = image.features.device
        n_dom, n_ctx = self.counts(n)
        dominant = topk_ascending(attention, n_dom).to(device)
        rest = torch.ones(n, dtype=torch.bool, device=device)
        rest[dominant] = False
        remaining = torch.nonzero(rest).flatten()
        empty = torch.empty(0, dtype=torch.long, device=device)
        if n_ctx == 0:
            return _Split(dominant, empty, empty, empty)
        step = max(1, remaining.numel() // n_ctx)
        slots = torch.arange(0, remaining.numel(), step, device=device)[:n_ctx]
        is_target = torch.zeros(remaining.numel(), dtype=torch.bool, device=device)
        is_target[slots] = True
        targets, merged = remaining[is_target], remaining[~is_target]
        keys = image.require("keys", type(self).__name__).float()
        keys = keys / keys.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        assignment = (keys[merged] @ keys[targets].T).argmax(dim=1)
        return _Split(dominant, targets, assignment, merged)

    def select(self, image: ImageTokens) -> torch.Tensor:
        s = self.split(image)
        return torch.sort(torch.cat([s.dominant, s.targets])).values

    def merge(self, image: ImageTokens, kept: torch.Tensor, split: Optional[_Split] = None) -> torch.Tensor:
        s = split if split is not None else self.split(image)
        out = image.features.index_select(0, kept).clone()
        if s.targets.numel() == 0:
            return out
        feats = image.features
        total = torch.zeros(s.targets.numel(), feats.shape[1], dtype=torch.float32, device=feats.device)
        total.index_add_(0, s.assignment, feats[s.merged].float())
        count = torch.bincount(s.assignment, minlength=s.targets.numel()).clamp_min(1).to(total)
        contextual = (feats[s.targets].float() + total / count[:, None]).to(feats.dtype)
        slot = torch.searchsorted(kept, s.targets)
        out[slot] = contextual
        return out
