"""FlowCut: information-flow-aware visual token pruning (Tong et al., NeurIPS 2025, "FlowCut:
Rethinking Redundancy via Information Flow for Efficient Vision-Language Models").

Scores follow the flow of information through the vision encoder. At every encoder layer ``l`` and
for each still-alive token ``i``:

    s_l(i) = (a_l(i) / sum_alive a_l + v_l(i) / sum_alive v_l) * ||V_l(i)||_1

where ``a_l`` is the attention the [CLS] token (encoders without one, e.g. Qwen2.5-VL: the mean
query) pays each token, ``v_l`` the softmax similarity of the [CLS] value to each token's value
(absent without a [CLS]: the term is dropped, as in the public Qwen code) and ``V_l`` the token's
value vector averaged over heads. Scores accumulate as ``cum = 0.5 * cum + 0.5 * s_l``.

Schedule (the public code, ``select_layer = depth - 2``): with ``L`` encoder layers feeding the
feature layer, the last cut happens after layer ``F = L - 2`` (an adapter may set
``extras["flow_final_layer"]``: the public Qwen code cuts last after the final block, ``F = L - 1``);
``rpl = F - l`` layers remain. At every
layer with even ``rpl`` the lowest-``cum`` alive tokens are dropped: ``round((N - keep) / sqrt(rpl) *
(1 - H^2))`` of them, ``H`` the entropy of the alive tokens' attention over ``log N`` (``N`` alive);
at ``rpl = 0`` exactly ``keep`` remain. Scoring stops once ``keep`` tokens remain.

Where it runs: the public code shortens the encoder itself, so the dropped tokens no longer
influence later layers. Here the adapter records each layer's attention row, value similarity and
value norm from the unshortened encoder (forward hooks on the attention projections; the encoder
keeps SDPA/flash), and the schedule above replays the progressive cut on those records,
renormalising over the alive tokens at every layer. The kept tokens' embeddings are therefore the
full encoder's, the selection rule is the paper's, and the vision encoder itself is not sped up.
Images are cut independently (the public code takes the batch maximum of the adaptive amount).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Mapping, Sequence

import torch

from tokenprune.methods.base import ImageTokens, VisualPruner, register, topk_ascending


def layer_score(record: Mapping[str, torch.Tensor], alive: torch.Tensor) -> torch.Tensor:
    """``s_l`` of the alive tokens (``alive``: ascending indices) from one layer's record."""
    attention = record["attention"].float()[alive]
    score = attention / attention.sum().clamp_min(1e-12)
    similarity = record.get("value_similarity")
    if similarity is not None:
        similarity = similarity.float()[alive]
        score = score + similarity / similarity.sum().clamp_min(1e-12)
    return score * record["value_norm"].float()[alive]


def adaptive_drop(attention: torch.Tensor, remaining_layers: int, keep: int) -> int:
    """How many of the alive tokens to drop at a cut with ``remaining_layers`` (> 0) to go."""
    n = attention.numel()
    prob = attention.float() / attention.float().sum().clamp_min(1e-12)
    entropy = -(prob * torch.log(prob.clamp_min(1e-30))).sum()
    ratio = float(entropy) / math.log(n) if n > 1 else 1.0
    return int(round((n - keep) / math.sqrt(remaining_layers) * (1 - ratio**2)))


@register("flowcut")
@dataclass(frozen=True)
class FlowCut(VisualPruner):
    """Args:
        keep: tokens kept per image (int >= 1) or fraction kept (float in (0, 1]).
        decay: weight of the past in the cumulative score (0.5).
    """

    requires: ClassVar[frozenset[str]] = frozenset({"flow_layers"})

    keep: int | float = 64
    decay: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.decay, bool) or not isinstance(self.decay, (int, float)) or not 0.0 <= self.decay < 1.0:
            raise ValueError(f"decay must be a number in [0, 1), got {self.decay!r}")

    def select(self, image: ImageTokens) -> torch.Tensor:
        layers: Sequence[Mapping[str, torch.Tensor]] = image.require("flow_layers", type(self).__name__)
        n = image.num_tokens
        k = self.num_kept(n)
        device = image.features.device
        alive = torch.arange(n, device=device)
        if k >= n:
            return alive
        if not layers:
            raise ValueError("FlowCut needs at least one encoder layer record")
        last = min(int((image.extras or {}).get("flow_final_layer", max(len(layers) - 2, 0))), len(layers) - 1)
        cumulative = None
        for index, record in enumerate(layers[: last + 1]):
            if alive.numel() <= k:
                break
            score = layer_score(record, alive)
            cumulative = score if cumulative is None else self.decay * cumulative + (1 - self.decay) * score
            remaining = last - index
            if remaining % 2:
                continue
            drop = adaptive_drop(record["attention"][alive], remaining, k) if remaining else alive.numel()
            target = max(alive.numel() - drop, k)
            chosen = topk_ascending(cumulative, target)
            alive, cumulative = alive[chosen], cumulative[chosen]
        return alive
