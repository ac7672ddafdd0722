"""What :meth:`ContextPruner.prune` returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

__all__ = ["PrunedPassage", "ContextPruneResult"]


@dataclass
class PrunedPassage:
    """One passage after pruning.

    Attributes:
        passage: the pruned passage, same type as the input (a ``str``, or a copy of the input
            mapping whose ``"text"`` is pruned).
        index: position of the passage in the input list.
        sentences: the passage's sentences (they tile the original text).
        kept: indices of the kept sentences, ascending (original order).
        scores: keep score of every sentence (kept when ``>= threshold``).
        rerank_score: relevance of the passage to the question (scale of the scorer;
            ``-inf`` for an empty passage).
        chars_before / chars_after: length of the text before/after pruning.
        tokens_before / tokens_after: same in tokens of the counting tokenizer (``None`` when no
            tokenizer counted).
    """

    passage: Any
    index: int
    sentences: list[str]
    kept: list[int]
    scores: list[float]
    rerank_score: float
    chars_before: int
    chars_after: int
    tokens_before: Optional[int] = None
    tokens_after: Optional[int] = None


@dataclass
class ContextPruneResult:
    """The pruned passages retrieved for one question.

    ``passages`` lists the pruned passages in output order: the input order, or by decreasing
    rerank score when the pruner reorders, limited to ``top_k`` when it is set; ``order`` gives
    their input indices. ``details`` has one :class:`PrunedPassage` per *input* passage, in input
    order (passages dropped by ``top_k`` included).
    """

    question: str
    passages: list[Any]
    order: list[int]
    details: list[PrunedPassage] = field(default_factory=list)

    @property
    def kept_sentences(self) -> list[list[int]]:
        """Kept sentence indices of each output passage."""
        return [self.details[i].kept for i in self.order]

    @property
    def sentence_scores(self) -> list[list[float]]:
        return [self.details[i].scores for i in self.order]

    @property
    def rerank_scores(self) -> list[float]:
        return [self.details[i].rerank_score for i in self.order]

    @property
    def chars_before(self) -> int:
        """Characters of all input passages."""
        return sum(d.chars_before for d in self.details)

    @property
    def chars_after(self) -> int:
        """Characters of the output passages."""
        return sum(self.details[i].chars_after for i in self.order)

    @property
    def tokens_before(self) -> Optional[int]:
        if any(d.tokens_before is None for d in self.details):
            return None
        return sum(d.tokens_before for d in self.details)

    @property
    def tokens_after(self) -> Optional[int]:
        if any(self.details[i].tokens_after is None for i in self.order):
            return None
        return sum(self.details[i].tokens_after for i in self.order)

    @property
    def compression(self) -> float:
        """Fraction of characters removed, in [0, 1] (0 when there was nothing to prune)."""
        before = self.chars_before
        return 1.0 - self.chars_after / before if before else 0.0
