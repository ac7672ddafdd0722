"""Statistics of what pruning did during the last calls of a patched model."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional


@dataclass
class PruneRecord:
    """Tokens before/after for one image (``image`` set) or one decoder layer (``layer`` set).

    ``call`` numbers the patched top-level calls (``generate`` or a forward pass), ``row`` the batch
    row, ``image`` the image index inside that row, ``kept`` the indices kept inside the image.
    """

    call: int
    row: int
    before: int
    after: int
    image: Optional[int] = None
    layer: Optional[int] = None
    kind: str = "visual"
    #: kept token indices inside the image (ascending), for image records
    kept: Optional[tuple[int, ...]] = None


@dataclass
class PruneStats:
    """Accumulated :class:`PruneRecord` s of one patch handle.

    ``stats.last()`` holds the records of the most recent call; ``stats.summary()`` aggregates them.
    """

    records: list[PruneRecord] = field(default_factory=list)
    calls: int = 0
    _scope_depth: int = field(default=0, repr=False, compare=False)
    _scope_call: Optional[int] = field(default=None, repr=False, compare=False)

    def new_call(self) -> int:
        """Number a new call; inside :meth:`scope` every stage of one call shares the first number."""
        if self._scope_depth and self._scope_call is not None:
            return self._scope_call
        self.calls += 1
        if self._scope_depth:
            self._scope_call = self.calls
        return self.calls

    @contextlib.contextmanager
    def scope(self) -> Iterator[None]:
        """One top-level call (``generate`` or a forward pass) of a composition: the stages it runs
        (pre-LLM, in-LLM, KV) record under one call number."""
        self._scope_depth += 1
        try:
            yield
        finally:
            self._scope_depth -= 1
            if not self._scope_depth:
                self._scope_call = None

    def add(self, **kwargs: Any) -> None:
        self.records.append(PruneRecord(**kwargs))

    def last(self) -> list[PruneRecord]:
        return [r for r in self.records if r.call == self.calls]

    def per_image(self, call: Optional[int] = None) -> list[PruneRecord]:
        call = self.calls if call is None else call
        return [r for r in self.records if r.call == call and r.image is not None]

    def per_layer(self, call: Optional[int] = None) -> list[PruneRecord]:
        call = self.calls if call is None else call
        return [r for r in self.records if r.call == call and r.layer is not None]

    def summary(self) -> dict[str, Any]:
        """Totals over the last call: tokens before/after and the kept ratio. When several stages
        pruned (a composition), ``before`` is what the first one saw and ``after`` what the last one
        kept (image records when there are any; otherwise per-layer records, summed over layers)."""
        recs = self.per_image() or self.last()
        if recs:
            kinds = list(dict.fromkeys(r.kind for r in recs))  # in the order the stages ran
            before = sum(r.before for r in recs if r.kind == kinds[0])
            recs = [r for r in recs if r.kind == kinds[-1]]
        else:
            before = 0
        after = sum(r.after for r in recs)
        return {
            "call": self.calls,
            "images": len([r for r in recs if r.image is not None]),
            "tokens_before": before,
            "tokens_after": after,
            "kept_ratio": (after / before) if before else 1.0,
        }

    def clear(self) -> None:
        self.records.clear()
        self.calls = 0
