"""FastV: in-LLM visual token pruning (Chen et al., ECCV 2024, "An Image is Worth 1/2 Tokens
After Layer 2").

Before decoder layer ``K`` the image tokens are ranked by the attention the last prompt token pays
them at layer ``K - 1`` (mean over heads) and only the top ones continue to layers ``>= K``; the
text tokens are all kept. Pruning happens once, at prefill; decoding runs on the pruned cache of
layers ``>= K`` (layers ``< K`` keep every token). Paper defaults: K = 2, R = 50% dropped.

The score comes from ``tokenprune.kernels.attention_topk`` on layer ``K - 1``'s queries and keys,
so every layer keeps running SDPA/flash attention. Kept tokens keep their original positions.

``query="last"`` (default) ranks by the attention of the last prompt token, as the public code does;
``query="text_mean"`` averages the attention of every text token after the row's last image (the
instruction), closer to the paper's wording ("average attention received").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from tokenprune.methods.base import DecoderView, InLLMPruner, register


@register("fastv")
@dataclass(frozen=True)
class FastV(InLLMPruner):
    """Args:
        layer: K, the first decoder layer that sees the pruned sequence (``1 <= K < num_layers``).
        keep: image tokens kept per image: a count or a fraction (``0.5`` = the paper's R = 50%).
        impl: ``attention_topk`` implementation, ``"auto"`` | ``"triton"`` | ``"torch"``.
        query: ``"last"`` (last prompt token) or ``"text_mean"`` (mean over the text after the images).
    """

    layer: int = 2
    keep: int | float = 0.5
    impl: str = "auto"
    query: str = "last"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.query not in ("last", "text_mean"):
            raise ValueError(f"query must be 'last' or 'text_mean', got {self.query!r}")
        if self.impl not in ("auto", "triton", "torch"):
            raise ValueError(f"impl must be 'auto', 'triton' or 'torch', got {self.impl!r}")

    @property
    def query_rows(self) -> Optional[int]:
        return None if self.query == "text_mean" else 1

    def score(self, view: DecoderView) -> torch.Tensor:
        return view.attention(self.query, impl=self.impl)
