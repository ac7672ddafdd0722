"""The scorer interface of :class:`~tokenprune.methods.context.ContextPruner` and shared helpers.

A scorer turns (question, passage sentences) into one *keep score* per sentence and one rerank
score per passage. Keep scores live in [0, 1] and the pruner keeps a sentence when its score is
``>= threshold``, so threshold 0 keeps everything for every scorer; what a score means (a token
majority vote for Provence, similarity relative to the best sentence for the sentence-transformers
scorers) is each scorer's business and is documented in its file.

Windows: models read at most ``max_length`` tokens. Text longer than that is cut into
overlapping windows by the model's own (fast) tokenizer, each window is scored, and the results
are combined (max or mean, see each scorer): nothing is truncated silently.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Sequence

__all__ = [
    "PassageInput",
    "PassageScores",
    "SentenceScorer",
    "register_scorer",
    "available_scorers",
    "build_scorer",
    "windows",
    "relative_to_best",
]

_SCORERS: dict[str, type["SentenceScorer"]] = {}


def _key(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def register_scorer(name: str):
    """Class decorator registering a scorer under ``name`` (``ContextPruner(scorer=name)``)."""

    def decorator(cls: type["SentenceScorer"]) -> type["SentenceScorer"]:
        cls.name = _key(name)
        _SCORERS[cls.name] = cls
        return cls

    return decorator


def available_scorers() -> list[str]:
    return sorted(_SCORERS)


def build_scorer(name: str, **kwargs: Any) -> "SentenceScorer":
    if not isinstance(name, str):
        raise TypeError(f"scorer must be a scorer name or a SentenceScorer, got {type(name).__name__}")
    if _key(name) not in _SCORERS:
        raise ValueError(f"unknown scorer {name!r}; available scorers: {', '.join(available_scorers())}")
    return _SCORERS[_key(name)](**kwargs)


@dataclass(frozen=True)
class PassageInput:
    """One passage as a scorer sees it: its sentences (which tile ``text``) and the full text."""

    text: str
    sentences: tuple[str, ...]
    starts: tuple[int, ...]  # character offset of each sentence in ``text``


@dataclass
class PassageScores:
    """What a scorer returns for one passage.

    Attributes:
        keep: ``[n_sentences]`` keep scores in [0, 1]; kept when ``>= threshold``.
        raw: ``[n_sentences]`` the scorer's raw sentence scores (cosine, probability, ...), used to
            break ties between equal keep scores when ranking.
        rerank: passage relevance to the question (higher = more relevant; scale is the scorer's).
    """

    keep: list[float]
    raw: list[float]
    rerank: float


class SentenceScorer(ABC):
    """Scores the sentences of retrieved passages against a question.

    Subclasses implement :meth:`score` for a batch of questions at once (so the model sees large
    batches) and load their model lazily on first use.
    """

    name: ClassVar[str] = "abstract"
    #: threshold used by ContextPruner when neither ``threshold`` nor ``keep_ratio`` is given.
    default_threshold: ClassVar[float] = 0.5

    @abstractmethod
    def score(self, questions: Sequence[str], passages: Sequence[Sequence[PassageInput]]) -> list[list[PassageScores]]:
        """``passages[i]`` are the passages retrieved for ``questions[i]``; returns the same nesting."""

    @property
    def tokenizer(self) -> Any:
        """The model's tokenizer (used to count tokens when the caller gives none)."""
        raise NotImplementedError

    def to_config(self) -> dict[str, Any]:
        return {"scorer": self.name}


def windows(
    tokenizer: Any,
    texts: Sequence[str],
    max_length: int,
    pair_with: Optional[Sequence[str]] = None,
    overlap: float = 0.25,
) -> list[list[tuple[int, int]]]:
    """Character spans of the overlapping windows that cover each text within ``max_length`` tokens.

    With ``pair_with`` each window must fit beside ``pair_with[i]`` (a cross-encoder input
    ``[CLS] question [SEP] window [SEP]``). Texts that fit give one span ``(0, len(text))``.

    Raises:
        ValueError: ``pair_with[i]`` alone leaves no room for the text (question too long).
    """
    n_special = tokenizer.num_special_tokens_to_add(pair=pair_with is not None)
    lengths = [len(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]
    extra = [0] * len(texts)
    if pair_with is not None:
        extra = [len(ids) for ids in tokenizer(list(pair_with), add_special_tokens=False)["input_ids"]]
    out: list[list[tuple[int, int]]] = []
    for i, text in enumerate(texts):
        room = max_length - n_special - extra[i]
        if room < 8:
            raise ValueError(
                f"the question takes {extra[i]} of the scorer's {max_length} tokens: shorten it "
                "(at least 8 tokens must remain for the passage text)"
            )
        if lengths[i] <= room:
            out.append([(0, len(text))])
            continue
        stride = max(1, int(room * overlap))
        enc = tokenizer(
            text,
            truncation=True,
            max_length=room,
            stride=stride,
            return_overflowing_tokens=True,
            return_offsets_mapping=True,
            add_special_tokens=False,
        )
        spans = []
        for offsets in enc["offset_mapping"]:
            chars = [o for o in offsets if o[1] > o[0]]
            if chars:
                spans.append((chars[0][0], chars[-1][1]))
        out.append(spans or [(0, len(text))])
    return out


def relative_to_best(raw: Sequence[float]) -> list[float]:
    """Adaptive keep scores: each sentence's raw score divided by the passage's best one.

    The best sentence scores 1; a sentence half as similar scores 0.5; negative similarities
    score 0. When no sentence has a positive score every sentence scores 0 (the pruner then keeps
    only ``min_sentences``).
    """
    best = max(raw, default=0.0)
    if not best > 0 or not math.isfinite(best):
        return [0.0 for _ in raw]
    return [min(1.0, max(0.0, r / best)) for r in raw]
