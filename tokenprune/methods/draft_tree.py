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

import weakref
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Optional

from tokenprune.methods.base import Pruner, register

SOURCES = ("ngram", "recycling", "retrieval", "draft_model")


def _int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {minimum}, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


@register("draft_tree")
@dataclass
class DraftTree(Pruner):
    """Args:
        sources: draft sources, any of ``"ngram"``, ``"recycling"``, ``"retrieval"``, ``"draft_model"``.
        budget: draft tokens verified per target forward (int >= 0, root excluded) or ``"auto"``.
        max_depth: longest draft path (>= 1).
        max_width: draft nodes kept per depth (beam width, >= 1).
        max_budget: upper bound of the automatic budget (>= 1).
        ngram_max / ngram_min: n-gram sizes looked up by the ``ngram`` and ``retrieval`` sources.
        recycling_topk: successors per token in the recycling table.
        corpus: retrieval datastore: token-id sequences, or strings (tokenized with the
            ``corpus_tokenizer=`` passed to ``generate``).
        draft_model: an HF causal LM sharing the target's tokenizer (or a local path to one).
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
        if isinstance(self.sources, str):
            self.sources = (self.sources,)
        if not isinstance(self.sources, (list, tuple)) or not self.sources:
            raise TypeError(f"sources must be a non-empty tuple of names from {SOURCES}, got {self.sources!r}")
        self.sources = tuple(self.sources)
        for name in self.sources:
            if name not in SOURCES:
                raise ValueError(f"unknown source {name!r}; sources must be among {SOURCES}")
        if len(set(self.sources)) != len(self.sources):
            raise ValueError(f"sources must not repeat, got {self.sources}")
        if self.budget != "auto":
            _int("budget", self.budget, 0)
        for name, minimum in (("max_depth", 1), ("max_width", 1), ("max_budget", 1), ("ngram_max", 1),
                              ("ngram_min", 1), ("recycling_topk", 1), ("draft_topk", 1)):
            _int(name, getattr(self, name), minimum)
        if self.ngram_min > self.ngram_max:
            raise ValueError(f"ngram_min ({self.ngram_min}) must be <= ngram_max ({self.ngram_max})")
        self.corpus = tuple(self.corpus)
        if "retrieval" in self.sources and not self.corpus:
            raise ValueError("the 'retrieval' source needs a non-empty corpus (token-id lists or strings)")
        if "draft_model" in self.sources and self.draft_model is None:
            raise ValueError("the 'draft_model' source needs draft_model= (an HF causal LM or a local path)")
        self._reset_runtime()

    def _reset_runtime(self) -> None:
        # Runtime state (recycling table, latency model, draft KV) lives beside the config, not in
        # it, and belongs to one target model: the recycling table holds token ids of that model's
        # vocabulary and the latency model its timings. Keyed weakly, so a speculator goes away with
        # its model.
        self._speculators = weakref.WeakKeyDictionary()
        self._last = None

    def __getstate__(self) -> dict[str, Any]:
        # A copy (pickle, deepcopy) carries the configuration only; its runtime state starts empty.
        return {k: v for k, v in self.__dict__.items() if k not in ("_speculators", "_last")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset_runtime()

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
        if model is None:
            if self._last is None:
                self._last = self._build(tokenizer)
            return self._last
        spec = self._speculators.get(model)
        if spec is None:
            spec = self._speculators[model] = self._build(tokenizer)
        self._last = spec
        return spec

    def _build(self, tokenizer: Optional[Any]):
        from tokenprune.speculative.factory import build_speculator

        return build_speculator(self, tokenizer)
