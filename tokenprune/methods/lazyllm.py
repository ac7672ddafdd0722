"""LazyLLM: progressive, dynamic prompt-token pruning for long-context prefill (Fu et al., 2024,
"LazyLLM: Dynamic Token Pruning for Efficient Long Context LLM Inference", arXiv 2407.14057).

Before each layer ``l`` of the schedule, the prompt tokens still alive are ranked by the attention
the last token pays them at layer ``l - 1`` (mean over heads and GQA groups, computed with
``tokenprune.kernels.attention_topk`` so every layer keeps SDPA attention); only the top fraction
``keep_l`` of the prompt continues to layers ``>= l``, so the hidden states *and* KV of pruned
tokens are never computed at deeper layers. The last ``window`` prompt tokens (the last token among
them) are always kept. Kept tokens keep their original positions (their RoPE never changes).

Decoding repeats the selection at every step with the new token as the scorer (pruning is
*dynamic*): a token pruned at layer ``l`` during prefill keeps its layer-``l`` input hidden state in
an auxiliary cache, and when a later step selects it again its computation resumes from layer ``l``
(earlier layers are never re-run), so each token is computed at most once per layer and the total
work never exceeds the unpruned model's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch

from tokenprune.methods.base import DecoderView, SequencePruner, register

#: default schedule as (fraction of depth, fraction of the prompt kept): the issue's
#: ((4, 0.7), (8, 0.5), (16, 0.3)) for a 32-layer model, scaled to any depth.
DEFAULT_SCHEDULE = ((0.125, 0.7), (0.25, 0.5), (0.5, 0.3))


def _check_keep(keep: Any, where: str) -> float:
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise TypeError(f"{where}: keep must be a float in (0, 1], got {type(keep).__name__}")
    if not (math.isfinite(keep) and 0.0 < keep <= 1.0):
        raise ValueError(f"{where}: keep must be in (0, 1] (fraction of the prompt kept), got {keep}")
    return float(keep)


@register("lazyllm")
@dataclass(frozen=True)
class LazyLLM(SequencePruner):
    """Args:
        schedule: ``((layer, keep), ...)``: before decoder layer ``layer`` (``1 <= layer < depth``,
            strictly increasing) keep the fraction ``keep`` in (0, 1] of the prompt (non-increasing
            with depth). ``None`` resolves at patch time to layers at 1/8, 1/4 and 1/2 of the depth
            keeping 0.7, 0.5 and 0.3 of the prompt.
        window: the last ``window`` prompt tokens are always kept (>= 1: the last token is).
        revive: dynamic selection at decoding steps with the aux cache (the paper); ``False``
            prunes once at prefill and decodes on the pruned cache.
        impl: ``attention_topk`` implementation, ``"auto"`` | ``"triton"`` | ``"torch"``.
    """

    stage: ClassVar[str] = "prompt"
    tokens: ClassVar[str] = "prompt"
    stats_prefix: ClassVar[str] = "text"

    schedule: Optional[tuple[tuple[int, float], ...]] = None
    window: int = 32
    revive: bool = True
    impl: str = "auto"

    def __post_init__(self) -> None:
        if self.schedule is not None:
            if isinstance(self.schedule, (str, bytes)) or not hasattr(self.schedule, "__iter__"):
                raise TypeError(f"schedule must be a sequence of (layer, keep) pairs, got {type(self.schedule).__name__}")
            pairs = []
            for i, item in enumerate(self.schedule):
                if not hasattr(item, "__len__") or len(item) != 2:
                    raise ValueError(f"schedule[{i}] must be a (layer, keep) pair, got {item!r}")
                layer, keep = item
                if isinstance(layer, bool) or not isinstance(layer, int):
                    raise TypeError(f"schedule[{i}]: layer must be an int, got {type(layer).__name__}")
                if layer < 1:
                    raise ValueError(f"schedule[{i}]: layer must be >= 1 (scores come from layer - 1), got {layer}")
                pairs.append((layer, _check_keep(keep, f"schedule[{i}]")))
            if not pairs:
                raise ValueError("schedule must hold at least one (layer, keep) pair (or be None for the default)")
            for (l0, k0), (l1, k1) in zip(pairs, pairs[1:]):
                if l1 <= l0:
                    raise ValueError(f"schedule layers must be strictly increasing, got {l0} then {l1}")
                if k1 > k0:
                    raise ValueError(f"schedule keep fractions must not increase with depth, got {k0} then {k1}")
            object.__setattr__(self, "schedule", tuple(pairs))  # frozen: normalise once
        if isinstance(self.window, bool) or not isinstance(self.window, int):
            raise TypeError(f"window must be an int, got {type(self.window).__name__}")
        if self.window < 1:
            raise ValueError(f"window must be >= 1 (the last token is always kept), got {self.window}")
        if not isinstance(self.revive, bool):
            raise TypeError(f"revive must be a bool, got {type(self.revive).__name__}")
        if self.impl not in ("auto", "triton", "torch"):
            raise ValueError(f"impl must be 'auto', 'triton' or 'torch', got {self.impl!r}")

    def resolve_schedule(self, depth: int) -> tuple[tuple[int, float], ...]:
        """The schedule for a decoder of ``depth`` layers; ``ValueError`` if a layer is out of range."""
        if self.schedule is None:
            if depth < 2:
                raise ValueError(f"LazyLLM needs a decoder with >= 2 layers, got {depth}")
            by_layer: dict[int, float] = {}
            for frac, keep in DEFAULT_SCHEDULE:
                layer = min(depth - 1, max(1, int(depth * frac + 0.5)))
                by_layer[layer] = min(keep, by_layer.get(layer, 1.0))
            return tuple(sorted(by_layer.items()))
        for layer, _ in self.schedule:
            if layer >= depth:
                raise ValueError(
                    f"schedule layer {layer} is out of range: must be in [1, {depth - 1}] for this model "
                    f"({depth} decoder layers)"
                )
        return self.schedule

    def score(self, view: DecoderView) -> torch.Tensor:
        return view.attention("last", impl=self.impl)

    def protected(self, index: torch.Tensor, length: int) -> torch.Tensor:
        return (index >= length - self.window) & (index < length)

    @property
    def revives(self) -> bool:
        return self.revive
