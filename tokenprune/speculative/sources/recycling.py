"""Token Recycling (Luo et al., ACL 2025, arXiv 2408.08696): the target's own past candidates.

An adjacency table ``[V, k]`` holds, for every token, the target's top-``k`` next tokens the last
time that token was seen in a verified tree (with their target probabilities). It is updated from
the logits of *every* tree node after each verification, rejected branches included, and it
persists across ``generate`` calls ("hot start"). Drafting expands the root through the table
breadth-first; unlike the paper's static template, each node keeps the target probability of its
edge, so the tree can be pruned by path score like a draft-model tree.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from tokenprune.speculative.sources.base import DraftSource
from tokenprune.speculative.tree import TokenTree

__all__ = ["RecyclingSource"]


class RecyclingSource(DraftSource):
    name = "recycling"

    def __init__(self, topk: int = 8, branching: Sequence[int] = (4, 2, 2, 1, 1, 1, 1, 1)):
        self.topk = topk
        self.branching = tuple(branching)
        self.next_tokens: Optional[torch.Tensor] = None  # [V, k] long, -1 = unknown
        self.next_logp: Optional[torch.Tensor] = None  # [V, k] float32 log-probabilities

    def _ensure(self, vocab: int) -> None:
        if self.next_tokens is None or self.next_tokens.shape[0] < vocab:
            tokens = torch.full((vocab, self.topk), -1, dtype=torch.long)
            logp = torch.full((vocab, self.topk), -math.inf, dtype=torch.float32)
            if self.next_tokens is not None:
                tokens[: self.next_tokens.shape[0]] = self.next_tokens
                logp[: self.next_logp.shape[0]] = self.next_logp
            self.next_tokens, self.next_logp = tokens, logp

    def propose(self, context: Sequence[int], max_depth: int) -> TokenTree:
        root = int(context[-1])
        tree = TokenTree(root)
        if self.next_tokens is None or root >= self.next_tokens.shape[0]:
            return tree
        frontier = [0]
        for depth in range(min(max_depth, len(self.branching))):
            width = self.branching[depth]
            parents = [tree.tokens[p] for p in frontier]
            rows = self.next_tokens[parents, :width].tolist()
            logps = self.next_logp[parents, :width].tolist()
            new = []
            for p, row, lps in zip(frontier, rows, logps):
                for token, lp in zip(row, lps):
                    if token >= 0:
                        before = len(tree)
                        node = tree.add(p, token, lp)
                        if len(tree) > before:
                            new.append(node)
            frontier = new
            if not frontier:
                break
        return tree

    @torch.no_grad()
    def observe(self, tree: TokenTree, logits: torch.Tensor) -> None:
        self._ensure(logits.shape[-1])
        logp, tokens = torch.log_softmax(logits.float(), dim=-1).topk(self.topk, dim=-1)
        index = tree.token_tensor()
        self.next_tokens[index] = tokens.cpu()
        self.next_logp[index] = logp.cpu()
