"""Provence scorer: sentence pruning by token-level sequence labelling (Chirkova et al., ICLR 2025,
"Provence: efficient and robust context pruning for retrieval-augmented generation",
arXiv 2501.16214).

A Provence checkpoint is a cross-encoder reranker with two heads on one encoder pass over
``[CLS] question [SEP] passage [SEP]``:

* ``token_classifier``: ``Linear(hidden, 2)`` on every token; softmax column 1 is the token's
  probability of being kept;
* ``pooler.dense`` + ``classifier``: a DeBERTa-style context pooler on the first token followed by
  ``Linear(pooler_hidden, num_labels)``; logit 0 is the passage's reranking score.

This loader reads such a checkpoint from a local directory (``config.json``, tokenizer files,
``model.safetensors`` or ``pytorch_model.bin`` with keys ``<backbone prefix>.*``, ``pooler.dense.*``,
``classifier.*``, ``token_classifier.*``). It builds the backbone with ``AutoModel.from_config``
from the standard transformers classes; ``trust_remote_code`` stays off unless the user passes it.

Decision rule (paper §3, "sentence rounding"): a sentence is kept when more than half of its
tokens have a keep probability at or above the threshold (default 0.1, the paper's conservative
setting; 0.5 prunes more). Equivalently the sentence's keep score is its ``(n//2 + 1)``-th largest
token probability, which is what :meth:`ProvenceScorer.score` returns, so that the pruner's
``score >= threshold`` rule is exactly the majority vote (and ratio mode ranks by it).

Passages longer than the 512-token window are read in overlapping windows (the question is
repeated in each); a token seen by several windows gets the mean of its probabilities and the
passage's rerank score is the best window's.
"""

from __future__ import annotations

import bisect
import functools
import os
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import nn

from tokenprune.methods.context.scorers.base import PassageInput, PassageScores, SentenceScorer, register_scorer

__all__ = ["ProvenceScorer", "ProvenceModel", "sentence_keep_score", "load_provence"]


def sentence_keep_score(token_probs: Sequence[float]) -> float:
    """Keep score of a sentence from its tokens' keep probabilities.

    ``score >= t`` iff more than half of the tokens have probability ``>= t``: the
    ``(n//2 + 1)``-th largest probability. A sentence with no token scores 0.
    """
    n = len(token_probs)
    if n == 0:
        return 0.0
    return float(sorted(token_probs, reverse=True)[n // 2])


class ProvenceModel(nn.Module):
    """Encoder + token-classification head + ranking head (the Provence checkpoint layout).

    ``forward(input_ids [B, L], attention_mask [B, L], token_type_ids [B, L] | None)`` returns
    ``(keep_probs [B, L], rerank [B])``.
    """

    def __init__(self, config: Any, backbone: nn.Module):
        super().__init__()
        from transformers.activations import ACT2FN

        hidden = config.hidden_size
        pooler_size = getattr(config, "pooler_hidden_size", None) or hidden
        self.backbone = backbone
        self.pooler = nn.Module()
        self.pooler.dense = nn.Linear(hidden, pooler_size)
        self.pooler_act = ACT2FN[getattr(config, "pooler_hidden_act", None) or "gelu"]
        self.classifier = nn.Linear(pooler_size, max(1, int(getattr(config, "num_labels", 1))))
        self.token_classifier = nn.Linear(hidden, 2)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        kwargs = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, **kwargs)[0]
        keep = self.token_classifier(hidden).float().softmax(-1)[..., 1]
        rerank = self.classifier(self.pooler_act(self.pooler.dense(hidden[:, 0])))[:, 0].float()
        return keep, rerank


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    st = os.path.join(path, "model.safetensors")
    if os.path.exists(st):
        from safetensors.torch import load_file

        return load_file(st)
    pt = os.path.join(path, "pytorch_model.bin")
    if os.path.exists(pt):
        return torch.load(pt, map_location="cpu", weights_only=True)
    raise ValueError(f"no model.safetensors or pytorch_model.bin in the Provence checkpoint directory {path!r}")


@functools.lru_cache(maxsize=4)
def load_provence(path: str, device: str = "cpu", trust_remote_code: bool = False) -> tuple[ProvenceModel, Any]:
    """Load ``(model, tokenizer)`` from a local Provence-format directory (see module docstring).

    Raises:
        ValueError: not a directory, a weight of the layout is missing or unexpected, or the
            tokenizer is not a fast tokenizer (character offsets are needed).
    """
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    if not os.path.isdir(path):
        raise ValueError(f"model must be a local Provence checkpoint directory, got {path!r}")
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=True)
    try:  # BERT-like backbones carry their own pooler, which the Provence layout does not use
        backbone = AutoModel.from_config(config, trust_remote_code=trust_remote_code, add_pooling_layer=False)
    except TypeError:
        backbone = AutoModel.from_config(config, trust_remote_code=trust_remote_code)
    model = ProvenceModel(config, backbone)
    prefix = backbone.base_model_prefix + "."
    state = {}
    for key, value in _read_state_dict(path).items():
        state[("backbone." + key[len(prefix):]) if key.startswith(prefix) else key] = value
    missing, unexpected = model.load_state_dict(state, strict=False)
    params = {name for name, _ in model.named_parameters()}
    missing = [k for k in missing if k in params]
    if missing or unexpected:
        raise ValueError(
            f"{path!r} is not a Provence-format checkpoint: missing weights {missing[:5]}, "
            f"unexpected weights {list(unexpected)[:5]} (expected '{prefix}*', 'pooler.dense.*', "
            "'classifier.*', 'token_classifier.*')"
        )
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=True)
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"the Provence scorer needs a fast tokenizer (character offsets); {path!r} has a slow one")
    return model.to(device).eval(), tokenizer


@register_scorer("provence")
@dataclass
class ProvenceScorer(SentenceScorer):
    """Args:
    model: local Provence-format checkpoint directory (required).
    device: torch device.
    batch_size: windows per forward.
    max_length: window length in tokens (default: the tokenizer's / model's limit, e.g. 512).
    trust_remote_code: passed to transformers; off unless you ask for it.
    """

    default_threshold = 0.1

    model: str = ""
    device: str = "cpu"
    batch_size: int = 32
    max_length: Optional[int] = None
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ValueError("the provence scorer needs model=<path of a local Provence-format checkpoint>")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {self.batch_size!r}")
        if self.max_length is not None and (not isinstance(self.max_length, int) or self.max_length < 16):
            raise ValueError(f"max_length must be None or an int >= 16, got {self.max_length!r}")

    @property
    def loaded(self) -> tuple[ProvenceModel, Any]:
        return load_provence(self.model, self.device, bool(self.trust_remote_code))

    @property
    def tokenizer(self) -> Any:
        return self.loaded[1]

    def to_config(self) -> dict[str, Any]:
        return {"scorer": self.name, "model": self.model}

    def _window(self, model: ProvenceModel, tokenizer: Any) -> int:
        if self.max_length is not None:
            return self.max_length
        limit = getattr(model.backbone.config, "max_position_embeddings", 512)
        return int(min(limit, tokenizer.model_max_length))

    def token_probabilities(
        self, pairs: Sequence[tuple[str, str]]
    ) -> tuple[list[dict[int, float]], list[float]]:
        """Per (question, passage) pair: ``{char_offset_of_token: keep probability}`` over the
        passage tokens (mean over windows), and the rerank score (max over windows)."""
        model, tokenizer = self.loaded
        max_length = self._window(model, tokenizer)
        questions = [q for q, _ in pairs]
        texts = [t for _, t in pairs]
        q_len = max((len(ids) for ids in tokenizer(questions, add_special_tokens=False)["input_ids"]), default=0)
        room = max_length - q_len - tokenizer.num_special_tokens_to_add(pair=True)
        if room < 8:
            raise ValueError(
                f"the question takes {q_len} of the scorer's {max_length} tokens: shorten it "
                "(at least 8 tokens must remain for the passage)"
            )
        enc = tokenizer(
            questions, texts, truncation="only_second", max_length=max_length, stride=max(1, room // 4),
            return_overflowing_tokens=True, return_offsets_mapping=True, padding=True, return_tensors="pt",
        )
        owner = enc["overflow_to_sample_mapping"].tolist()
        sums: list[dict[int, list[float]]] = [{} for _ in pairs]
        rerank = [float("-inf")] * len(pairs)
        device = next(model.parameters()).device
        with torch.inference_mode():
            for lo in range(0, len(owner), self.batch_size):
                hi = min(lo + self.batch_size, len(owner))
                tti = enc.get("token_type_ids")
                keep, rank = model(
                    enc["input_ids"][lo:hi].to(device),
                    enc["attention_mask"][lo:hi].to(device),
                    None if tti is None or model.backbone.config.type_vocab_size < 2 else tti[lo:hi].to(device),
                )
                keep, rank = keep.cpu(), rank.cpu()
                for row in range(hi - lo):
                    w = lo + row
                    pi = owner[w]
                    rerank[pi] = max(rerank[pi], float(rank[row]))
                    seq_ids = enc.sequence_ids(w)
                    offsets = enc["offset_mapping"][w].tolist()
                    probs = keep[row].tolist()
                    for t, sid in enumerate(seq_ids):
                        if sid == 1 and offsets[t][1] > offsets[t][0]:
                            acc = sums[pi].setdefault(offsets[t][0], [0.0, 0])
                            acc[0] += probs[t]
                            acc[1] += 1
        means = [{c: s / n for c, (s, n) in d.items()} for d in sums]
        return means, rerank

    def score(self, questions: Sequence[str], passages: Sequence[Sequence[PassageInput]]) -> list[list[PassageScores]]:
        pairs, where = [], []
        for qi, (q, group) in enumerate(zip(questions, passages)):
            for pi, p in enumerate(group):
                if p.sentences:
                    pairs.append((q, p.text))
                    where.append((qi, pi))
        token_probs, rerank = self.token_probabilities(pairs) if pairs else ([], [])
        found = {key: (tp, rr) for key, tp, rr in zip(where, token_probs, rerank)}
        out = []
        for qi, group in enumerate(passages):
            result = []
            for pi, p in enumerate(group):
                if not p.sentences:
                    result.append(PassageScores([], [], float("-inf")))
                    continue
                probs, rr = found[(qi, pi)]
                per_sentence: list[list[float]] = [[] for _ in p.sentences]
                for char, prob in probs.items():
                    per_sentence[bisect.bisect_right(p.starts, char) - 1].append(prob)
                keep = [sentence_keep_score(ps) for ps in per_sentence]
                raw = [sum(ps) / len(ps) if ps else 0.0 for ps in per_sentence]
                result.append(PassageScores(keep, raw, rr))
            out.append(result)
        return out
