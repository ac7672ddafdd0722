"""Cross-encoder scorer: a sentence-transformers ``CrossEncoder`` reads each (question, sentence)
pair jointly and outputs a relevance probability (Nogueira & Cho 2019, "Passage re-ranking with
BERT"). More accurate than a bi-encoder, one joint forward per sentence and question.

Keep score: the adaptive rule of the bi-encoder on the probabilities
(:func:`~tokenprune.methods.context.scorers.base.adaptive_keep_scores`; the default threshold is
not tuned: no real cross-encoder checkpoint is available offline). Rerank score: the best sentence probability. A sentence too long to fit beside the
question in ``max_length`` tokens is cut into overlapping windows; its probability is the best
window's.

Any local cross-encoder checkpoint works (``CrossEncoder(path)``): one output label gives a
sigmoid probability, several labels a softmax whose last label is taken as "relevant".
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Sequence

from tokenprune.methods.context.scorers.base import (
    PassageInput,
    PassageScores,
    SentenceScorer,
    _check_exponents,
    adaptive_keep_scores,
    register_scorer,
    windows,
)

__all__ = ["CrossEncoderScorer"]


@functools.lru_cache(maxsize=4)
def _load(path: str, device: str, trust_remote_code: bool) -> Any:
    from sentence_transformers import CrossEncoder

    model = CrossEncoder(path, device=device, local_files_only=True, trust_remote_code=trust_remote_code)
    model.eval()
    return model


@register_scorer("cross-encoder")
@dataclass
class CrossEncoderScorer(SentenceScorer):
    """Args:
    model: path of a local cross-encoder checkpoint (required: none ships offline).
    device: torch device.
    batch_size: pairs per forward.
    trust_remote_code: passed to transformers; off unless you ask for it.
    sentence_exponent, passage_exponent: shape of the adaptive keep score.
    """

    default_threshold = 0.6

    model: str = ""
    device: str = "cpu"
    batch_size: int = 32
    trust_remote_code: bool = False
    sentence_exponent: float = 0.5
    passage_exponent: float = 2.0

    def __post_init__(self) -> None:
        _check_exponents(self.sentence_exponent, self.passage_exponent)
        if not isinstance(self.model, str) or not self.model:
            raise ValueError("the cross-encoder scorer needs model=<path of a local cross-encoder checkpoint>")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {self.batch_size!r}")

    @property
    def ce_model(self) -> Any:
        return _load(self.model, self.device, bool(self.trust_remote_code))

    @property
    def tokenizer(self) -> Any:
        return self.ce_model.tokenizer

    def to_config(self) -> dict[str, Any]:
        return {"scorer": self.name, "model": self.model}

    def _max_length(self) -> int:
        model = self.ce_model
        limit = getattr(model, "max_length", None) or getattr(model.tokenizer, "model_max_length", 512)
        config_limit = getattr(model.config, "max_position_embeddings", limit)
        return int(min(limit, config_limit))

    def score(self, questions: Sequence[str], passages: Sequence[Sequence[PassageInput]]) -> list[list[PassageScores]]:
        import torch

        model = self.ce_model
        pairs, owner = [], []  # owner: (question, passage, sentence) of each pair
        for qi, (q, group) in enumerate(zip(questions, passages)):
            flat = [(pi, si, s) for pi, p in enumerate(group) for si, s in enumerate(p.sentences)]
            if not flat:
                continue
            spans = windows(model.tokenizer, [s for _, _, s in flat], self._max_length(), pair_with=[q] * len(flat))
            for (pi, si, s), sentence_spans in zip(flat, spans):
                for a, b in sentence_spans:
                    pairs.append((q, s[a:b]))
                    owner.append((qi, pi, si))
        raw: dict[tuple[int, int, int], float] = {}
        if pairs:
            logits = model.predict(
                pairs, batch_size=self.batch_size, activation_fn=torch.nn.Identity(), convert_to_tensor=True,
                show_progress_bar=False,
            ).float()
            probs = logits.sigmoid() if logits.dim() == 1 else logits.softmax(-1)[:, -1]
            for key, p in zip(owner, probs.tolist()):
                raw[key] = max(raw.get(key, float("-inf")), p)
        out = []
        for qi, group in enumerate(passages):
            rows = [[raw[(qi, pi, si)] for si in range(len(p.sentences))] for pi, p in enumerate(group)]
            keep = adaptive_keep_scores(rows, self.sentence_exponent, self.passage_exponent)
            out.append([PassageScores(k, r, max(r, default=float("-inf"))) for k, r in zip(keep, rows)])
        return out
