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

from tokenprune.methods.context.segment import split_sentences

__all__ = [
    "PassageInput",
    "PassageScores",
    "SentenceScorer",
    "register_scorer",
    "available_scorers",
    "build_scorer",
    "windows",
    "adaptive_keep_scores",
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

    @classmethod
    def from_text(cls, text: str, language: str = "en") -> "PassageInput":
        """Segment ``text`` into sentences (:func:`~tokenprune.methods.context.segment.split_sentences`)."""
        sents = split_sentences(text, language)
        return cls(text, tuple(s.text for s in sents), tuple(s.start for s in sents))


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


def adaptive_keep_scores(
    raw: Sequence[Sequence[float]], sentence_exponent: float = 0.5, passage_exponent: float = 2.0
) -> list[list[float]]:
    """Adaptive keep scores of the passages retrieved for one question, from raw sentence scores.

    ``raw[p][i]`` is the raw score (cosine similarity, probability; higher = more relevant) of
    sentence ``i`` of passage ``p``. With ``best_p`` the best raw score of passage ``p`` and
    ``best`` the best over all passages of the question::

        keep[p][i] = (raw[p][i] / best_p) ** sentence_exponent * (best_p / best) ** passage_exponent

    clipped to [0, 1]. The first factor is relative to the passage's best sentence (how much of
    the passage is about as relevant as its best part); the second is the passage's relevance
    relative to the best retrieved passage, so passages far below the best one are pruned down to
    ``min_sentences``. ``passage_exponent=0`` gives a purely per-passage rule. The best sentence
    of the best passage scores 1; non-positive raw scores score 0.
    """
    flat = [r for group in raw for r in group]
    best = max(flat, default=0.0)
    out = []
    for group in raw:
        best_p = max(group, default=0.0)
        if not (best > 0 and best_p > 0 and math.isfinite(best)):
            out.append([0.0 for _ in group])
            continue
        gate = (best_p / best) ** passage_exponent
        out.append([min(1.0, (max(0.0, r) / best_p) ** sentence_exponent * gate) for r in group])
    return out


def _check_exponents(sentence_exponent: float, passage_exponent: float) -> None:
    for name, value in (("sentence_exponent", sentence_exponent), ("passage_exponent", passage_exponent)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 <= value < math.inf):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
