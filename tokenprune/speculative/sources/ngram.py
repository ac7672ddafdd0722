"""Prompt / n-gram lookup (Saxena's prompt lookup decoding; vLLM's ``ngram`` proposer) as a tree.

The longest suffix n-gram of the sequence (``max_ngram`` down to ``min_ngram`` tokens) is looked
up in the prompt and the generated text; the continuations of its most recent ``max_matches``
occurrences are merged into a trie, so that competing continuations become sibling branches
instead of one arbitrary chain (HF keeps the first match only, vLLM the earliest).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from tokenprune.speculative.sources.base import DraftSource, tree_from_continuations
from tokenprune.speculative.tree import TokenTree

__all__ = ["NGramSource"]


class NGramSource(DraftSource):
    name = "ngram"

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1, max_matches: int = 8, confidence: float = 0.8):
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram
        self.max_matches = max_matches
        self.confidence = confidence

    def propose(self, context: Sequence[int], max_depth: int) -> TokenTree:
        ctx = np.asarray(context, dtype=np.int64)
        root = int(ctx[-1])
        history = ctx[:-1]  # a match must leave at least one token to continue with
        for n in range(min(self.max_ngram, len(ctx) - 1), self.min_ngram - 1, -1):
            windows = np.lib.stride_tricks.sliding_window_view(history, n)
            starts = np.flatnonzero((windows == ctx[-n:]).all(axis=1))
            if starts.size:
                ends = starts[::-1][: self.max_matches] + n  # most recent occurrences first
                conts = [ctx[e : e + max_depth].tolist() for e in ends]
                return tree_from_continuations(root, conts, self.confidence)
        return TokenTree(root)
