"""The patch handle: a reversible set of changes applied to a model (or tokenizer, engine...).

Integrations record every change through the handle (attribute overrides, hooks), so that
:meth:`PatchHandle.remove` restores the target exactly: attributes that were absent are deleted
again, never left behind as copies of the class attribute.
"""

from __future__ import annotations

from typing import Any, Callable

from tokenprune.stats import PruneStats

_MISSING = object()
HANDLE_ATTR = "_tokenprune_handle"


class PatchHandle:
    """Returned by :func:`tokenprune.patch`; a context manager, also removable with :meth:`remove`.

    Attributes:
        target: the patched object.
        method: the pruning method applied.
        stats: :class:`~tokenprune.stats.PruneStats` of the calls made while patched.
    """

    def __init__(self, target: Any, method: Any):
        self.target = target
        self.method = method
        self.stats = PruneStats()
        self._undo: list[Callable[[], None]] = []
        self.active = True

    # ---------------------------------------------------------------- recording changes
    def set_attr(self, obj: Any, name: str, value: Any) -> None:
        """Set ``obj.<name>`` (instance attribute) and remember how to undo it exactly."""
        previous = obj.__dict__.get(name, _MISSING) if hasattr(obj, "__dict__") else _MISSING

        def undo() -> None:
            if previous is _MISSING:
                obj.__dict__.pop(name, None)
            else:
                obj.__dict__[name] = previous

        setattr(obj, name, value)
        self._undo.append(undo)

    def add_hook(self, removable: Any) -> None:
        """Register a torch hook handle (anything with ``.remove()``)."""
        self._undo.append(removable.remove)

    def on_remove(self, fn: Callable[[], None]) -> None:
        self._undo.append(fn)

    # ---------------------------------------------------------------- lifecycle
    def remove(self) -> None:
        """Undo every change, newest first. Idempotent."""
        if not self.active:
            return
        errors = []
        while self._undo:
            try:
                self._undo.pop()()
            except Exception as exc:  # keep undoing the rest; report afterwards
                errors.append(exc)
        self.active = False
        if errors:
            raise RuntimeError(f"tokenprune: {len(errors)} change(s) could not be undone: {errors[0]!r}")

    def __enter__(self) -> "PatchHandle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return f"PatchHandle({type(self.target).__name__}, {self.method!r}, {state})"


def install(target: Any, method: Any, apply: Callable[[PatchHandle], None]) -> PatchHandle:
    """Create a handle, run ``apply(handle)``; on any error undo what was done and re-raise.

    Guarantees that a failing patch never leaves a half-patched target, and refuses to patch a
    target that is already patched by tokenprune.
    """
    existing = getattr(target, "__dict__", {}).get(HANDLE_ATTR)
    if existing is not None and existing.active:
        raise RuntimeError(
            f"{type(target).__name__} is already patched by tokenprune ({existing.method!r}); "
            "remove that patch first"
        )
    handle = PatchHandle(target, method)
    try:
        handle.set_attr(target, HANDLE_ATTR, handle)
        apply(handle)
    except BaseException:
        handle.remove()
        raise
    return handle


def active_handle(target: Any) -> PatchHandle | None:
    """The active tokenprune patch of ``target``, if any (its ``.stats`` hold the statistics)."""
    handle = getattr(target, "__dict__", {}).get(HANDLE_ATTR)
    return handle if handle is not None and handle.active else None
