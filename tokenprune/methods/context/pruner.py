"""ContextPruner: Provence-style sentence-level pruning and reranking of retrieved passages.

Each passage is split into sentences (:mod:`.segment`), a scorer gives every sentence a keep score
in [0, 1] and the passage a rerank score in the same pass, and the pruner keeps, in original order:

* threshold mode (default): the sentences scoring ``>= threshold``, so the amount pruned adapts to
  each passage (Provence, Chirkova et al. 2025, arXiv 2501.16214);
* ratio mode (``keep_ratio``): the best ``keep_ratio`` fraction of each passage's sentences;

and in both modes at least the best ``min_sentences`` sentences, plus the title (see
``always_keep_title``). Passages can then be reordered by rerank score and cut to ``top_k``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Optional, Sequence, Union

from tokenprune.methods.base import (
    Pruner,
    check_bool,
    check_device,
    check_int,
    check_number,
    register,
    resolve_keep,
)
from tokenprune.methods.context.result import ContextPruneResult, PrunedPassage
from tokenprune.methods.context.scorers import PassageInput, PassageScores, SentenceScorer, build_scorer

__all__ = ["ContextPruner"]

Passage = Union[str, Mapping]
#: an ISO 639 language code, optionally with a region or script subtag ("en", "pt-BR", "zh_hans").
_LANGUAGE = re.compile(r"[A-Za-z]{2,3}([-_][A-Za-z0-9]{2,8})*")


def _passage_text(passage: Any, where: str) -> str:
    if isinstance(passage, str):
        return passage
    if isinstance(passage, Mapping) and isinstance(passage.get("text"), str):
        return passage["text"]
    raise TypeError(
        f"{where} must be a str or a mapping with a str 'text' (and optional 'title'), got {type(passage).__name__}"
    )


@register("context")
@dataclass(frozen=True)
class ContextPruner(Pruner):
    """Sentence-level pruning of the passages retrieved for a question.

    Args:
        scorer: ``"bi-encoder"`` (default, offline all-MiniLM-L6-v2), ``"cross-encoder"``,
            ``"provence"``, or a :class:`SentenceScorer` instance.
        model: local model path for the named scorer (``None``: the scorer's default; the
            cross-encoder and provence scorers need one).
        threshold: keep sentences scoring ``>= threshold``, in [0, 1]; 0 keeps everything.
            ``None`` with no ``keep_ratio``: the scorer's default (bi-encoder 0.43, cross-encoder
            0.6, provence 0.1).
        keep_ratio: instead of a threshold, keep this fraction (0, 1] of each passage's sentences.
        min_sentences: keep at least this many sentences of each passage (>= 0), the title
            counted: the best-scoring ones are added when too few pass.
        always_keep_title: for ``str`` passages the first sentence is the title (Provence's
            convention) and is always kept. Mapping passages carry their title in ``"title"``,
            which is never pruned.
        reorder: output passages by decreasing rerank score (stable) instead of input order.
        top_k: keep only the ``top_k`` passages with the best rerank scores (``None``: all).
        language: ISO 639 code for the sentence segmenter.
        device, batch_size, trust_remote_code: passed to the named scorer.
        max_chars: the most characters one :meth:`prune` call takes, summed over every passage of
            every question (``None``: no limit). Cost grows linearly with the text (about 3-4 kB/s
            on one busy CPU core with the default bi-encoder, and about +200 MB peak memory per 1 MB;
            docs/context_pruning.md); a larger input raises ``ValueError`` before any work.
    """

    stage: ClassVar[str] = "context"

    scorer: Union[str, SentenceScorer] = "bi-encoder"
    model: Optional[str] = None
    threshold: Optional[float] = None
    keep_ratio: Optional[float] = None
    min_sentences: int = 1
    always_keep_title: bool = True
    reorder: bool = False
    top_k: Optional[int] = None
    language: str = "en"
    device: str = "cpu"
    batch_size: int = 32
    trust_remote_code: bool = False
    max_chars: Optional[int] = 1_000_000
    _scorer: SentenceScorer = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.threshold is not None and self.keep_ratio is not None:
            raise ValueError("give either threshold (adaptive) or keep_ratio (fixed fraction), not both")
        check_number("threshold", self.threshold, 0.0, 1.0, optional=True)
        check_number("keep_ratio", self.keep_ratio, 0.0, 1.0, low_open=True, optional=True)
        check_int("min_sentences", self.min_sentences, 0)
        check_int("batch_size", self.batch_size, 1)
        check_int("top_k", self.top_k, 1, optional=True)
        check_int("max_chars", self.max_chars, 1, optional=True)
        for name in ("always_keep_title", "reorder", "trust_remote_code"):
            check_bool(name, getattr(self, name))
        if not isinstance(self.language, str) or not _LANGUAGE.fullmatch(self.language):
            error = ValueError if isinstance(self.language, str) else TypeError
            raise error(f"language must be an ISO 639 code such as 'en' or 'pt-br', got {self.language!r}")
        check_device("device", self.device)
        if self.model is not None and not isinstance(self.model, str):
            raise TypeError(f"model must be a local path (str) or None, got {type(self.model).__name__}")
        if self.model == "":
            raise ValueError("model must be a local path or None (the scorer's default), got ''")
        if isinstance(self.scorer, SentenceScorer):
            if self.model is not None:
                raise ValueError("model= configures a named scorer; give the path to the scorer instance instead")
            object.__setattr__(self, "_scorer", self.scorer)
        elif isinstance(self.scorer, str):
            kwargs: dict[str, Any] = {"device": self.device, "batch_size": self.batch_size}
            if self.model is not None:
                kwargs["model"] = self.model
            if self.trust_remote_code:
                kwargs["trust_remote_code"] = True
            object.__setattr__(self, "_scorer", build_scorer(self.scorer, **kwargs))
        else:
            raise TypeError(
                f"scorer must be a scorer name ('bi-encoder', 'cross-encoder', 'provence') or a SentenceScorer, "
                f"got {type(self.scorer).__name__}"
            )

    # ------------------------------------------------------------------ public API
    @property
    def effective_threshold(self) -> Optional[float]:
        """The threshold in use (``None`` in ratio mode)."""
        if self.keep_ratio is not None:
            return None
        return self._scorer.default_threshold if self.threshold is None else float(self.threshold)

    def to_config(self) -> dict[str, Any]:
        config: dict[str, Any] = {"method": self.name}
        for f in fields(self):
            if f.init:
                config[f.name] = getattr(self, f.name)
        if isinstance(self.scorer, SentenceScorer):
            config.update(self.scorer.to_config())
        return config

    def prune(
        self,
        question: Union[str, Sequence[str]],
        passages: Union[Sequence[Passage], Sequence[Sequence[Passage]]],
        *,
        tokenizer: Any = None,
    ) -> Union[ContextPruneResult, list[ContextPruneResult]]:
        """Prune the passages retrieved for one question, or for several at once.

        ``prune(q, [p1, p2])`` returns one :class:`ContextPruneResult`;
        ``prune([q1, q2], [[p11, p12], [p21]])`` returns one per question, scored in one batch.
        Passages are ``str`` or mappings with ``"text"`` (and optional ``"title"``, never pruned).

        Args:
            tokenizer: counts tokens before/after (e.g. the generator's tokenizer); default: the
                scorer's tokenizer.
        """
        single = isinstance(question, str)
        if single:
            questions, groups = [question], [passages]
        else:
            if not isinstance(question, Sequence) or not all(isinstance(q, str) for q in question):
                raise TypeError("question must be a str or a list of str")
            questions, groups = list(question), passages
            if not isinstance(groups, Sequence) or len(groups) != len(questions):
                raise ValueError(
                    f"with {len(questions)} questions, passages must be a list of {len(questions)} passage lists"
                )
        results = self._prune_batch(questions, groups, tokenizer)
        return results[0] if single else results

    # ------------------------------------------------------------------ internals
    def _prune_batch(self, questions: list[str], groups: Any, tokenizer: Any) -> list[ContextPruneResult]:
        texts: list[list[str]] = []
        for qi, group in enumerate(groups):
            if isinstance(group, (str, Mapping)) or not isinstance(group, Sequence):
                raise TypeError(f"passages for question {qi} must be a list of passages, got {type(group).__name__}")
            texts.append([_passage_text(p, f"passage {pi} of question {qi}") for pi, p in enumerate(group)])
        total = sum(len(text) for row in texts for text in row)
        if self.max_chars is not None and total > self.max_chars:
            raise ValueError(
                f"the passages hold {total:,} characters, more than max_chars={self.max_chars:,} (pruning costs "
                "time and memory in proportion to the text; see docs/context_pruning.md): split them over "
                "several prune calls, or raise the bound with ContextPruner(max_chars=...) (max_chars=None: no limit)"
            )
        inputs = [[PassageInput.from_text(text, self.language) for text in row] for row in texts]
        scores = self._scorer.score(questions, inputs)
        counter = tokenizer if tokenizer is not None else self._scorer.tokenizer
        results = []
        for q, group, row, row_scores in zip(questions, groups, inputs, scores):
            details = [
                self._prune_one(pi, passage, inp, sc)
                for pi, (passage, inp, sc) in enumerate(zip(group, row, row_scores))
            ]
            results.append(ContextPruneResult(q, [], self._order(details), details))
        self._count_tokens(results, counter)
        for res in results:
            res.passages = [res.details[i].passage for i in res.order]
        return results

    def _select(self, scores: PassageScores, n: int, forced: set[int]) -> list[int]:
        body = [i for i in range(n) if i not in forced]
        ranked = sorted(body, key=lambda i: (-scores.keep[i], -scores.raw[i], i))
        if self.keep_ratio is not None:
            chosen = set(ranked[: resolve_keep(float(self.keep_ratio), len(body))])
        else:
            t = self.effective_threshold
            chosen = {i for i in body if scores.keep[i] >= t}
        chosen.update(ranked[: max(0, self.min_sentences - len(forced))])
        return sorted(chosen | forced)

    def _prune_one(self, index: int, passage: Any, inp: PassageInput, scores: PassageScores) -> PrunedPassage:
        n = len(inp.sentences)
        if len(scores.keep) != n or len(scores.raw) != n:
            raise RuntimeError(f"{type(self._scorer).__name__} returned {len(scores.keep)} scores for {n} sentences")
        forced = {0} if (self.always_keep_title and isinstance(passage, str) and n > 0) else set()
        kept = self._select(scores, n, forced)
        if len(kept) == n:
            text = inp.text
        else:
            text = "".join(inp.sentences[i] for i in kept).rstrip()
        if isinstance(passage, str):
            out: Any = text
        else:
            out = dict(passage)
            out["text"] = text
        return PrunedPassage(
            passage=out, index=index, sentences=list(inp.sentences), kept=kept, scores=list(scores.keep),
            rerank_score=float(scores.rerank), chars_before=len(inp.text), chars_after=len(text),
        )

    def _order(self, details: list[PrunedPassage]) -> list[int]:
        by_rank = sorted(range(len(details)), key=lambda i: (-details[i].rerank_score, i))
        chosen = by_rank if self.top_k is None else by_rank[: self.top_k]
        return chosen if self.reorder else sorted(chosen)

    @staticmethod
    def _count_tokens(results: list[ContextPruneResult], tokenizer: Any) -> None:
        if tokenizer is None:
            return
        items = [d for res in results for d in res.details]
        texts = ["".join(d.sentences) for d in items] + [_passage_text(d.passage, "") for d in items]
        lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]] if texts else []
        for d, before, after in zip(items, lengths[: len(items)], lengths[len(items) :]):
            d.tokens_before, d.tokens_after = before, after
