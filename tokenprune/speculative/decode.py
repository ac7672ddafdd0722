"""The tree-speculation loop, independent of the inference engine.

A *target* is anything with four methods (the HF implementation is
``tokenprune.integrations.hf.speculative.HFTarget``):

* ``prefill(ids [1, L]) -> logits [V]``: run the prompt, fill the cache, return the last row;
* ``verify(tree) -> logits [N, V]``: one forward over the tree (ancestor mask, depth positions)
  on top of the committed prefix;
* ``commit(nodes)``: keep the prefix plus the KV of ``nodes`` (root first), drop the rest;
* ``prefix_len``: committed positions in the cache;
* optionally ``prefill_tree(ids [1, L - 1], tree) -> logits [N, V]``: prefill and verify a first tree
  rooted at the last prompt token in the same forward (one forward fewer per call).

:class:`TreeSpeculator` holds the sources and the latency model, which persist across ``generate``
calls (the recycling table warms up, the latency model is measured once per target model).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch

from tokenprune.speculative.latency import LatencyModel, choose_budget
from tokenprune.speculative.prune import prune_tree, ranked_nodes
from tokenprune.speculative.sources.base import DraftSource
from tokenprune.speculative.tree import TokenTree
from tokenprune.speculative.verify import Processor, accept_greedy, accept_sample

__all__ = ["TreeSpeculator", "SpecStats", "speculative_generate"]

LATENCY_SIZES = (1, 2, 4, 8, 16, 32, 64, 128)
# Longest prompt whose prefill also verifies the first tree (its mask is [L + N, L + N]).
FUSED_PREFILL_MAX = 4096


@dataclass
class SpecStats:
    """What one ``generate`` call did. ``forwards`` counts every target forward, prefill included."""

    forwards: int = 0
    new_tokens: int = 0
    accepted: list[int] = field(default_factory=list)  # draft tokens accepted per verification
    candidates: list[int] = field(default_factory=list)  # draft nodes proposed per verification
    verified: list[int] = field(default_factory=list)  # draft nodes kept (verified) per verification

    @property
    def tokens_per_forward(self) -> float:
        """Mean tokens emitted per verification forward (accepted drafts + the bonus token)."""
        return (sum(self.accepted) + len(self.accepted)) / len(self.accepted) if self.accepted else 1.0

    @property
    def forwards_per_token(self) -> float:
        """Target forwards per generated token (plain decoding: 1.0)."""
        return self.forwards / self.new_tokens if self.new_tokens else 0.0

    def summary(self) -> dict[str, float]:
        n = max(len(self.verified), 1)
        return {
            "forwards": self.forwards,
            "new_tokens": self.new_tokens,
            "tokens_per_forward": self.tokens_per_forward,
            "forwards_per_token": self.forwards_per_token,
            "mean_candidates": sum(self.candidates) / n,
            "mean_verified": sum(self.verified) / n,
        }


class TreeSpeculator:
    """Builds, merges and prunes draft trees; runs the speculative loop on a target.

    Args:
        sources: draft sources; their trees are merged by longest common prefix.
        budget: draft nodes verified per step (int) or ``"auto"`` (latency model).
        max_depth / max_width: pruning limits (see :func:`~tokenprune.speculative.prune.prune_tree`).
        max_budget: cap for the automatic budget and the largest latency measurement.
        rescorer: a source with ``rescore(tree, context)`` (a draft model) that re-scores merged trees
            (RASD); used only when other sources contribute.
    """

    def __init__(self, sources: Sequence[DraftSource], budget: int | str = "auto", max_depth: int = 8,
                 max_width: Optional[int] = 8, max_budget: int = 64, rescorer: Any = None):
        self.sources = list(sources)
        self.budget = budget
        self.max_depth = max_depth
        self.max_width = max_width
        self.max_budget = max_budget
        self.rescorer = rescorer
        self.latency: dict[Any, LatencyModel] = {}
        self.stats = SpecStats()

    # ------------------------------------------------------------------ drafting
    def draft(self, context: Sequence[int], max_depth: Optional[int] = None,
              latency: Optional[LatencyModel] = None) -> tuple[TokenTree, TokenTree]:
        """(candidate tree merged from all sources, pruned tree to verify)."""
        depth = self.max_depth if max_depth is None else min(max_depth, self.max_depth)
        merged = TokenTree(int(context[-1]))
        if depth < 1:
            return merged, merged
        for source in self.sources:
            merged.merge(source.propose(context, depth))
        if self.rescorer is not None and len(self.sources) > 1:
            merged = self.rescorer.rescore(merged, context)
        if self.budget == "auto":
            if latency is None:
                raise ValueError("budget='auto' needs a latency model")
            ranked = ranked_nodes(merged, depth, self.max_width)
            scores = merged.scores()[ranked] if ranked else torch.zeros(0)
            budget = choose_budget(scores, latency, self.max_budget)
        else:
            budget = int(self.budget)
        return merged, prune_tree(merged, budget, depth, self.max_width)

    def check_vocab(self, vocab_size: int) -> None:
        """``ValueError`` if a source could propose token ids outside the target's ``vocab_size``."""
        for source in self.sources:
            source.check_vocab(vocab_size)

    def observe(self, tree: TokenTree, logits: torch.Tensor) -> None:
        for source in self.sources:
            source.observe(tree, logits)

    def latency_model(self, key: Any, target: Any) -> LatencyModel:
        """The latency model of ``target`` (measured on first use, then cached under ``key``)."""
        if key not in self.latency:
            sizes = [n for n in LATENCY_SIZES if n <= self.max_budget + 1]

            def forward(n: int) -> None:
                chain = TokenTree(0)
                chain.add_path([0] * (n - 1))
                target.verify(chain)
                target.commit([])

            self.latency[key] = LatencyModel.measure(forward, sizes)
        return self.latency[key]


def speculative_generate(target: Any, speculator: TreeSpeculator, input_ids: torch.Tensor, *,
                         process: Optional[Processor], stop: Callable[[torch.Tensor], bool],
                         do_sample: bool = False, max_length: Optional[int] = None,
                         latency_key: Any = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Generate with tree speculation; returns ``[1, L + new]`` ids.

    Args:
        target: see the module docstring.
        input_ids: ``[1, L]`` prompt.
        process: logits processor ``(ids [1, l], scores [1, V]) -> [1, V]`` (warpers included when
            sampling), applied exactly where plain decoding would apply it.
        stop: ``stop(ids) -> bool`` checked after every emitted token (EOS, max length...).
        do_sample: greedy (exact) or lossless sampling acceptance.
        max_length: total length cap, used to avoid drafting past the end.
        latency_key: cache key of the target's latency model (``budget="auto"``).
    """
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(
            f"tree speculative decoding supports batch size 1 only (rows accept different numbers of "
            f"tokens); got input_ids of shape {tuple(input_ids.shape)}. Call generate once per prompt."
        )
    stats = speculator.stats = SpecStats()
    for source in speculator.sources:
        source.reset()
    ids = input_ids

    def emit(token: int) -> bool:
        nonlocal ids
        ids = torch.cat([ids, ids.new_tensor([[token]])], dim=1)
        stats.new_tokens += 1
        return stop(ids)

    def pick(logits: torch.Tensor) -> int:
        scores = logits[None].float()
        if process is not None:
            scores = process(ids, scores)
        if do_sample:
            return int(torch.multinomial(torch.softmax(scores[0].double().cpu(), -1).float(), 1, generator=generator))
        return int(scores[0].argmax())

    first_forward = None
    known_latency = speculator.budget != "auto" or latency_key in speculator.latency
    if ids.shape[1] >= 2 and known_latency and hasattr(target, "prefill_tree") and ids.shape[1] <= FUSED_PREFILL_MAX:
        # The last prompt token is already a root: verify the first tree inside the prefill forward
        # (as HF assisted decoding does with its first candidates), saving one target forward.
        def first_forward(tree: TokenTree, prompt: torch.Tensor = input_ids) -> torch.Tensor:
            return target.prefill_tree(prompt[:, :-1], tree)
    else:
        stats.forwards += 1
        if emit(pick(target.prefill(ids))):
            return ids
    latency = speculator.latency_model(latency_key, target) if speculator.budget == "auto" else None
    while True:
        # Each step emits the accepted drafts plus one bonus token: never draft past max_length.
        depth_cap = max(max_length - ids.shape[1] - 1, 0) if max_length is not None else None
        candidates, tree = speculator.draft(ids[0].tolist(), depth_cap, latency)
        logits = first_forward(tree) if first_forward is not None else target.verify(tree)
        first_forward = None
        stats.forwards += 1
        speculator.observe(tree, logits)
        if do_sample:
            path, bonus = accept_sample(tree, logits, ids, process, generator)
        else:
            path, bonus = accept_greedy(tree, logits, ids, process)
        target.commit(path)
        stats.accepted.append(len(path) - 1)
        stats.candidates.append(len(candidates) - 1)
        stats.verified.append(len(tree) - 1)
        for token in [tree.tokens[n] for n in path[1:]] + [bonus]:
            if emit(token):
                return ids
