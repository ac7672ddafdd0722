"""Retrieval datastore (REST / RASD retrieval branch): suffix match against user-supplied text.

Quan et al., "Retrieval-Augmented Speculative Decoding" (RASD, 2025) and He et al., "REST" (2024):
continuations of the sequence's longest suffix found in a datastore become a retrieval tree. Here
the datastore is a list of token sequences (documents, code, earlier answers) indexed once by
every n-gram of ``min_ngram..max_ngram`` tokens, so a lookup is a dict access per n.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

from tokenprune.speculative.sources.base import DraftSource, tree_from_continuations
from tokenprune.speculative.tree import TokenTree

__all__ = ["RetrievalSource"]


class RetrievalSource(DraftSource):
    name = "retrieval"

    def __init__(self, corpus: Sequence[Sequence[int]], max_ngram: int = 4, min_ngram: int = 1,
                 max_matches: int = 16, confidence: float = 0.8, max_continuation: int = 16):
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram
        self.max_matches = max_matches
        self.confidence = confidence
        self.max_continuation = max_continuation
        self.docs = [list(map(int, doc)) for doc in corpus]
        # (n-gram) -> [(doc, end)]: positions right after each occurrence, first max_matches kept
        self.index: dict[tuple[int, ...], list[tuple[int, int]]] = defaultdict(list)
        for d, doc in enumerate(self.docs):
            for n in range(min_ngram, max_ngram + 1):
                for end in range(n, len(doc)):
                    hits = self.index[tuple(doc[end - n : end])]
                    if len(hits) < max_matches:
                        hits.append((d, end))

    def check_vocab(self, vocab_size: int) -> None:
        for d, doc in enumerate(self.docs):
            bad = [t for t in doc if not 0 <= t < vocab_size]
            if bad:
                raise ValueError(
                    f"corpus[{d}] holds token id {bad[0]}, outside the target model's vocabulary ({vocab_size} "
                    "tokens): give token ids of the target's tokenizer (or strings with corpus_tokenizer=)"
                )

    def propose(self, context: Sequence[int], max_depth: int) -> TokenTree:
        root = int(context[-1])
        depth = min(max_depth, self.max_continuation)
        for n in range(min(self.max_ngram, len(context)), self.min_ngram - 1, -1):
            hits = self.index.get(tuple(int(t) for t in context[-n:]))
            if hits:
                conts = [self.docs[d][end : end + depth] for d, end in hits]
                return tree_from_continuations(root, conts, self.confidence)
        return TokenTree(root)
