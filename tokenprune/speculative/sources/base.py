"""The draft-source interface and the trie builder shared by the lookup sources."""

from __future__ import annotations

import math
from collections import Counter
from typing import Sequence

import torch

from tokenprune.speculative.tree import TokenTree

__all__ = ["DraftSource", "tree_from_continuations"]


class DraftSource:
    """Proposes a :class:`TokenTree` of guesses for what follows ``context``.

    ``context`` is every token of the sequence so far; its last token is the tree's root (the
    token the target has produced but not yet run). Sources keep their own state (an index, an
    adjacency table, a draft KV cache) across calls; :meth:`reset` drops per-sequence state only.
    """

    #: short name used in statistics and benchmark tables
    name: str = "source"

    def propose(self, context: Sequence[int], max_depth: int) -> TokenTree:
        raise NotImplementedError

    def observe(self, tree: TokenTree, logits: torch.Tensor) -> None:
        """Called after each verification with the target's logits ``[N, V]`` at every tree node."""

    def reset(self) -> None:
        """Forget per-sequence state (called at the start of each ``generate``)."""

    def check_vocab(self, vocab_size: int) -> None:
        """Raise ``ValueError`` if this source can propose a token id ``>= vocab_size`` (the target's
        vocabulary), which the target could not embed."""


def tree_from_continuations(root: int, continuations: Sequence[Sequence[int]], confidence: float) -> TokenTree:
    """Trie of retrieved continuations with frequency-based edge estimates.

    An edge's log-prob is ``log(confidence * count(path + token) / count(path))``: the share of the
    retrieved continuations that go on with ``token``, discounted by how often a retrieved token is
    right at all (``confidence``). Without a draft model this is the only signal available
    (Token Recycling / REST rank by frequency, research/spec_tree.md §5-6).
    """
    tree = TokenTree(root)
    counts: Counter = Counter()
    for cont in continuations:
        for d in range(1, len(cont) + 1):
            counts[tuple(cont[:d])] += 1
    total = sum(1 for c in continuations if c)
    if not total:
        return tree
    log_conf = math.log(confidence)
    # Shorter prefixes first, so each parent exists before its children.
    for prefix in sorted(counts, key=len):
        parent_count = counts[prefix[:-1]] if len(prefix) > 1 else total
        parent = 0 if len(prefix) == 1 else tree_node(tree, prefix[:-1])
        tree.add(parent, prefix[-1], log_conf + math.log(counts[prefix] / parent_count))
    return tree


def tree_node(tree: TokenTree, path: Sequence[int]) -> int:
    node = 0
    for token in path:
        node = tree.child(node, token)
    return node
