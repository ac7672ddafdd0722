"""DraftTree: speculative decoding with pruned draft trees (stage ``"speculative"``).

Guesses for the next tokens come from one or more *sources* (prompt/n-gram lookup, a Token
Recycling adjacency table, a retrieval datastore, a small draft model), are merged into one tree by
longest common prefix, pruned to a token budget EAGLE-2 style (Li et al., 2024: per-depth beam,
then global top-``budget`` by path score), and verified by the target in one forward with an
ancestor mask. Greedy output is identical to plain greedy decoding; sampling uses the lossless
multi-candidate rule. ``budget="auto"`` picks the budget at every step from a measured latency
model of the target (Sequoia, Chen et al., 2024). See ``docs/speculative.md``.
"""

from __future__ import annotations

import operator
import weakref
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Optional

import torch

from tokenprune.methods.base import Pruner, check_int, register

SOURCES = ("ngram", "recycling", "retrieval", "draft_model")


def _corpus(value: Any) -> tuple:
    """``corpus`` normalised to a tuple of strings and tuples of token ids (``>= 0``)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise TypeError(f"corpus must be a tuple of documents (token-id sequences or strings), got {type(value).__name__}")
    docs: list = []
    for i, doc in enumerate(value):
        if isinstance(doc, str):
            if not doc:
                raise ValueError(f"corpus[{i}] is an empty string")
            docs.append(doc)
            continue
        if isinstance(doc, (bytes, dict)) or not hasattr(doc, "__iter__"):
            raise TypeError(f"corpus[{i}] must be a string or a sequence of token ids, got {type(doc).__name__}")
        ids = []
        for token in doc:
            if isinstance(token, bool) or not hasattr(token, "__index__"):
                raise TypeError(f"corpus[{i}] must hold int token ids, got {type(token).__name__} {token!r}")
            ids.append(operator.index(token))
        if not ids or min(ids) < 0:
            raise ValueError(f"corpus[{i}] must be a non-empty sequence of token ids >= 0, got {ids[:8]}")
        docs.append(tuple(ids))
    return tuple(docs)


class _Runtime:
    """What a DraftTree learns while decoding, beside its (frozen) configuration: one speculator per
    target model, keyed weakly so that it goes away with its model (the recycling table holds token
    ids of that model's vocabulary, the latency model its timings), and the latest one used."""

    __slots__ = ("speculators", "last")

    def __init__(self) -> None:
        self.speculators: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.last = None


@register("draft_tree")
@dataclass(frozen=True)
class DraftTree(Pruner):
    """Args:
        sources: draft sources, any of ``"ngram"``, ``"recycling"``, ``"retrieval"``, ``"draft_model"``.
        budget: draft tokens verified per target forward (int >= 0, root excluded) or ``"auto"``.
        max_depth: longest draft path (>= 1).
        max_width: draft nodes kept per depth (beam width, >= 1).
        max_budget: upper bound of the automatic budget (>= 1).
        ngram_max / ngram_min: n-gram sizes looked up by the ``ngram`` and ``retrieval`` sources.
        recycling_topk: successors per token in the recycling table.
        corpus: retrieval datastore (``retrieval`` source only): token-id sequences, or strings
            (tokenized with the ``corpus_tokenizer=`` passed to ``generate``).
        draft_model: an HF causal LM sharing the target's tokenizer (or a local path to one);
            ``draft_model`` source only.
        draft_topk: children per node (and beam width) of the draft model's expansion.
    """

    stage: ClassVar[str] = "speculative"

    sources: tuple = ("ngram", "recycling")
    budget: int | str = "auto"
    max_depth: int = 10
    max_width: int = 8
    max_budget: int = 32
    ngram_max: int = 3
    ngram_min: int = 1
    recycling_topk: int = 8
    corpus: tuple = ()
    draft_model: Any = None
    draft_topk: int = 4

    def __post_init__(self) -> None:
        sources = (self.sources,) if isinstance(self.sources, str) else self.sources
        if not isinstance(sources, (list, tuple)) or not sources:
            raise TypeError(f"sources must be a non-empty tuple of names from {SOURCES}, got {self.sources!r}")
        for name in sources:
            if name not in SOURCES:
                raise ValueError(f"unknown source {name!r}; sources must be among {SOURCES}")
        if len(set(sources)) != len(sources):
            raise ValueError(f"sources must not repeat, got {tuple(sources)}")
        object.__setattr__(self, "sources", tuple(sources))  # frozen: normalise once
        if not (isinstance(self.budget, str) and self.budget == "auto"):
            if isinstance(self.budget, bool) or not isinstance(self.budget, int):
                raise TypeError(f"budget must be an int >= 0 or 'auto', got {type(self.budget).__name__} {self.budget!r}")
            check_int("budget", self.budget, 0)
        for name, minimum in (("max_depth", 1), ("max_width", 1), ("max_budget", 1), ("ngram_max", 1),
                              ("ngram_min", 1), ("recycling_topk", 1), ("draft_topk", 1)):
            check_int(name, getattr(self, name), minimum)
        if self.ngram_min > self.ngram_max:
            raise ValueError(f"ngram_min ({self.ngram_min}) must be <= ngram_max ({self.ngram_max})")
        object.__setattr__(self, "corpus", _corpus(self.corpus))
        if ("retrieval" in self.sources) != bool(self.corpus):
            raise ValueError("the 'retrieval' source needs a non-empty corpus (token-id lists or strings)"
                             if self.corpus == () else "corpus is used by the 'retrieval' source only: add it to sources")
        model = self.draft_model
        if model is not None:
            if isinstance(model, str) and not model:
                raise ValueError("draft_model must be an HF causal LM or a local path to one, got ''")
            if not isinstance(model, str) and not (
                isinstance(model, torch.nn.Module) and callable(getattr(model, "get_output_embeddings", None))
            ):
                raise TypeError(
                    f"draft_model must be an HF causal LM (with an LM head) or a local path to one, got {type(model).__name__}"
                )
        if ("draft_model" in self.sources) != (model is not None):
            raise ValueError("the 'draft_model' source needs draft_model= (an HF causal LM or a local path)"
                             if model is None else "draft_model is used by the 'draft_model' source only: add it to sources")
        object.__setattr__(self, "_runtime", _Runtime())

    def __getstate__(self) -> dict[str, Any]:
        # A copy (pickle, deepcopy) carries the configuration only; its runtime state starts empty.
        return {k: v for k, v in self.__dict__.items() if k != "_runtime"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        object.__setattr__(self, "_runtime", _Runtime())

    def to_config(self) -> dict[str, Any]:
        model = self.draft_model
        if model is not None and not isinstance(model, str):
            model = getattr(getattr(model, "config", None), "name_or_path", None) or type(model).__name__
        corpus = [c if isinstance(c, str) else list(map(int, c)) for c in self.corpus]
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return {"method": self.name, **values, "sources": list(self.sources), "corpus": corpus, "draft_model": model}

    def speculator(self, tokenizer: Optional[Any] = None, model: Optional[Any] = None):
        """The persistent :class:`~tokenprune.speculative.decode.TreeSpeculator` of this method on ``model``.

        One per target model, built on first use and reused, so the recycling table and latency
        model carry over between ``generate`` calls on that model and never reach another one
        (one method object can serve several models, whatever their vocabularies). ``model=None``:
        the speculator last returned (after ``generate``: that call's), or a model-independent one
        before any (vLLM's proposer, which serves one model). ``tokenizer`` encodes string entries of ``corpus``.
        ``speculator(model=m).stats`` are the statistics of the latest call on ``m``.
        """
        runtime = self._runtime
        if model is None:
            if runtime.last is None:
                runtime.last = self._build(tokenizer)
            return runtime.last
        spec = runtime.speculators.get(model)
        if spec is None:
            spec = runtime.speculators[model] = self._build(tokenizer)
        runtime.last = spec
        return spec

    def _build(self, tokenizer: Optional[Any]):
        from tokenprune.speculative.factory import build_speculator

        return build_speculator(self, tokenizer)
