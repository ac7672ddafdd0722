"""SnapKV: prompt KV-cache compression after prefill (Li et al., NeurIPS 2024, "SnapKV: LLM Knows
What You are Looking for Before Generation", arXiv 2404.14469).

After the prefill of each decoder layer, every prompt key outside the observation window is scored
by the attention the last ``window`` prompt queries pay it (softmax over the whole prompt, summed
over the window queries and averaged over the query heads sharing a KV head), smoothed with a 1-D
average pool of width ``kernel``; each KV head keeps its top ``keep - window`` keys plus the window
itself. Decoding runs on the compressed cache with the kept tokens' original positions. Published
defaults: window 32, kernel 5 (``init_snapkv``); kvpress uses window 64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenprune.kernels import attention_topk
from tokenprune.methods.base import KVPruner, KVView, register


def snapkv_scores(q: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor, window: int, kernel: int,
                  scale: float, impl: str = "auto") -> torch.Tensor:
    """Pooled SnapKV votes ``[B, Hk, L - window]`` of the prompt keys outside the window.

    ``q`` ``[B, Hq, window, D]`` the window's queries, ``keys`` ``[B, Hk, L, D]`` (both post-RoPE),
    ``valid`` ``[B, L]``. Per KV head: softmax attention of the window queries over the whole prompt
    (causal), averaged over the window and the query heads of the group, then average-pooled over
    key positions (width ``kernel``, zero padding counted, as SnapKV/kvpress do).
    """
    hq, w = q.shape[1], q.shape[2]
    hk, length = keys.shape[1], keys.shape[2]
    group = hq // hk
    votes = torch.stack([
        attention_topk(q[:, h * group:(h + 1) * group], keys[:, h:h + 1], 1, key_start=0, key_end=length - w,
                       causal=True, scale=scale, key_padding_mask=valid, impl=impl)[1]
        for h in range(hk)
    ], 1)
    return torch.nn.functional.avg_pool1d(votes, kernel, stride=1, padding=kernel // 2)


@register("snapkv")
@dataclass(frozen=True)
class SnapKV(KVPruner):
    """Args:
        keep: KV entries kept per layer and KV head: a count (>= 1) or a fraction in (0, 1] of the
            prompt; the window counts towards it.
        window: number of last prompt queries that vote (the observation window), >= 1.
        kernel: width of the average pooling over key positions, odd, >= 1.
        impl: ``attention_topk`` implementation, ``"auto"`` | ``"triton"`` | ``"torch"``.
    """

    keep: int | float = 0.5
    window: int = 32
    kernel: int = 5
    impl: str = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("window", "kernel"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.kernel % 2 == 0:
            raise ValueError(f"kernel must be odd (centred pooling), got {self.kernel}")
        if self.impl not in ("auto", "triton", "torch"):
            raise ValueError(f"impl must be 'auto', 'triton' or 'torch', got {self.impl!r}")

    def score(self, view: KVView) -> torch.Tensor:
        w = min(self.window, view.keys.shape[2])
        votes = snapkv_scores(view.queries(w), view.keys, view.valid, w, self.kernel, view.scale, self.impl)
        return torch.cat([votes, votes.new_zeros(*votes.shape[:2], w)], -1)  # the window is always kept
