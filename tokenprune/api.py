"""``tp.patch`` (context manager / handle), ``tp.prune`` (decorator) and ``tp.compose``: the user-facing hooks.

Which integration patches a target is decided by the method's ``stage``; integrations are imported
lazily so that ``import tokenprune`` needs torch only.

Composition: ``tp.patch(target, [tp.ContextPruner(...), tp.DivPrune(64), tp.SnapKV(0.5)])`` (or
``tp.compose(...)``) orders the methods by where they act on a request — RAG context, then pre-LLM
visual tokens, then tokens inside the decoder, then its KV cache, then speculative decoding — refuses
combinations that cannot share a model (two methods of one stage, two decoder policies that both
rewrite the sequence, ...) before anything is patched, and applies each method to the target it acts
on: the context stage to a tokenizer/processor (or a vLLM ``LLM``), the others to the model.

A method that acts at several stages (stage ``"composite"``, e.g. ``tp.ToDRE``) declares one policy
per stage in :meth:`~tokenprune.methods.base.Pruner.components`; it is checked, ordered and installed
like a composition of those policies, while the handle, ``to_config()`` and messages keep its name.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterable, Optional, Sequence

from tokenprune.methods.base import Pruner
from tokenprune.patching import PatchHandle

#: where each stage acts on a request, first to last.
STAGE_ORDER = ("context", "visual", "llm", "prompt", "kv", "speculative")

#: stage pairs that cannot run together, and why.
_CONFLICTS = {
    frozenset({"llm", "prompt"}): "both drop tokens between decoder layers; compose one of them",
    frozenset({"speculative", "llm"}): "draft-tree verification runs its own decoding loop on the full cache",
    frozenset({"speculative", "prompt"}): "draft-tree verification runs its own decoding loop on the full cache",
    frozenset({"speculative", "kv"}): "draft-tree verification runs its own decoding loop on the full cache",
    frozenset({"speculative", "visual"}): "draft trees patch text decoders, visual pruning vision-language models",
}


def _flatten(methods: Iterable[Any]) -> list[Pruner]:
    """The methods of a list, nested compositions flattened (multi-stage methods stay whole)."""
    flat: list[Pruner] = []
    for i, method in enumerate(methods):
        if isinstance(method, Compose):
            flat += list(method.methods)
        elif isinstance(method, Pruner):
            flat.append(method)
        elif isinstance(method, str):
            raise TypeError(f"methods[{i}] must be a tokenprune method object; build one with tp.build({method!r}, ...)")
        else:
            raise TypeError(f"methods[{i}] must be a tokenprune method (e.g. tp.DivPrune(keep=64)), "
                            f"got {type(method).__name__}")
    return flat


def _label(component: Pruner, owner: Pruner) -> str:
    """How messages name a component: its own class, or its multi-stage method's with the stage."""
    if component is owner:
        return type(owner).__name__
    return f"{type(owner).__name__} (its {component.stage!r} stage)"


@dataclass(frozen=True)
class Compose(Pruner):
    """Several methods applied together, ordered by stage (``STAGE_ORDER``).

    Args:
        methods: tokenprune methods (or compositions, flattened), at most one per stage; a
            multi-stage method (ToDRE) occupies each of its stages.

    Raises:
        TypeError: an element is not a tokenprune method.
        ValueError: the list is empty, two methods share a stage, or two stages conflict
            (the message says why).
    """

    stage: ClassVar[str] = "composite"
    name: ClassVar[str] = "compose"

    methods: tuple = ()

    def __post_init__(self) -> None:
        if isinstance(self.methods, (Pruner, str)) or not isinstance(self.methods, Iterable):
            raise TypeError(f"methods must be a list of tokenprune methods, got {type(self.methods).__name__}")
        flat = _flatten(self.methods)
        if not flat:
            raise ValueError("methods must hold at least one tokenprune method")
        owned = [(component, method) for method in flat for component in method.components()]
        unknown = [(c, m) for c, m in owned if c.stage not in STAGE_ORDER]
        if unknown:
            component, owner = unknown[0]
            raise ValueError(f"{_label(component, owner)} (stage {component.stage!r}) cannot be composed; "
                             f"composable stages: {', '.join(STAGE_ORDER)}")
        by_stage: dict[str, tuple[Pruner, Pruner]] = {}
        for component, owner in owned:
            if component.stage in by_stage:
                raise ValueError(
                    f"{_label(*by_stage[component.stage])} and {_label(component, owner)} both act at stage "
                    f"{component.stage!r}; compose at most one method per stage"
                )
            by_stage[component.stage] = (component, owner)
        for pair, why in _CONFLICTS.items():
            if pair <= by_stage.keys():
                a, b = (_label(*by_stage[s]) for s in sorted(pair, key=STAGE_ORDER.index))
                raise ValueError(f"{a} and {b} cannot be composed: {why}")
        prompt = by_stage.get("prompt", (None, None))[0]
        if prompt is not None and "kv" in by_stage and getattr(prompt, "revives", False):
            raise ValueError(
                f"{type(prompt).__name__}(revive=True) and {_label(*by_stage['kv'])} cannot be composed: "
                "revival re-selects prompt tokens a compressed KV cache no longer holds; use revive=False"
            )
        object.__setattr__(self, "methods", tuple(sorted(flat, key=lambda m: STAGE_ORDER.index(m.components()[0].stage))))
        object.__setattr__(self, "_components", tuple(sorted((c for c, _ in owned),
                                                             key=lambda c: STAGE_ORDER.index(c.stage))))

    def components(self) -> tuple[Pruner, ...]:
        """Every single-stage policy of the composition, in stage order."""
        return self._components

    @property
    def stages(self) -> tuple[str, ...]:
        return tuple(c.stage for c in self.components())

    def to_config(self) -> dict[str, Any]:
        return {"method": self.name, "methods": [m.to_config() for m in self.methods]}

    def __call__(self, fn: Any) -> Any:
        """``@tp.compose(a, b)``: decorate ``model.generate`` (or a function calling it) like :func:`prune`."""
        return prune(self)(fn)


# stage -> "module:function" that patches a target for that stage and returns a PatchHandle.
PATCHERS: dict[str, str] = {
    "visual": "tokenprune.integrations.hf.model:patch_model",
    "llm": "tokenprune.integrations.hf.model:patch_model",
    "prompt": "tokenprune.integrations.hf.model:patch_model",
    "kv": "tokenprune.integrations.hf.model:patch_model",
    "speculative": "tokenprune.integrations.hf.speculative:patch_model",
    "context": "tokenprune.integrations.context:patch_context",
}
#: patches a model with a composition of its stages at once (they share one decoder runtime).
COMPOSITION_PATCHER = "tokenprune.integrations.hf.model:patch_model"

# stage -> "module:function(args, kwargs) -> target or None" used by ``prune`` to find the object
# to patch among a decorated function's arguments (default: the first torch.nn.Module).
TARGET_FINDERS: dict[str, str] = {}
TARGET_FINDERS["context"] = "tokenprune.integrations.context:find_target"


def _load(ref: str) -> Callable[..., Any]:
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


def _as_method(method: Any) -> Pruner:
    """A single method, or a :class:`Compose` for a list of methods (validated here)."""
    if isinstance(method, str):
        raise TypeError(f"method must be a tokenprune method object; build one with tp.build({method!r}, ...)")
    if isinstance(method, (list, tuple)):
        composed = Compose(tuple(method))
        return composed.methods[0] if len(composed.methods) == 1 else composed
    if not isinstance(method, Pruner):
        raise TypeError(f"method must be a tokenprune method (e.g. tp.DivPrune(keep=64)) or a list of them, "
                        f"got {type(method).__name__}")
    return method


def _find(stage: str, candidates: Sequence[Any]) -> Any:
    finder = TARGET_FINDERS.get(stage)
    if finder is not None:
        return _load(finder)(tuple(candidates), {})
    import torch

    return next((c for c in candidates if isinstance(c, torch.nn.Module)), None)


def _groups(targets: Sequence[Any], method: Pruner) -> list[tuple[Any, Pruner]]:
    """``[(target, method or Compose)]``: the context stage to its target, every other stage to the model."""
    owners = method.methods if isinstance(method, Compose) else (method,)
    context = [m for m in owners if m.components()[0].stage == "context"]
    rest = [m for m in owners if m.components()[0].stage != "context"]
    groups = []
    for part in (context, rest):
        if not part:
            continue
        target = _find(part[0].components()[0].stage, targets)
        if target is None:
            names = ", ".join(type(m).__name__ for m in part)
            wanted = ("a tokenizer, processor or vLLM LLM (it prunes chat-template documents)" if part is context
                      else "a model (torch.nn.Module)")
            raise ValueError(
                f"{names} needs {wanted} among the targets; patch every object the methods act on, e.g. "
                "tp.patch((processor, model), [tp.ContextPruner(...), tp.DivPrune(64)])"
            )
        groups.append((target, part[0] if len(part) == 1 else Compose(tuple(part))))
    return groups


def _patch_one(target: Any, method: Pruner) -> PatchHandle:
    if isinstance(method, Compose) or len(method.components()) > 1:  # one patch of all the stages
        return _load(COMPOSITION_PATCHER)(target, method)
    if method.stage not in PATCHERS:
        raise NotImplementedError(f"no integration can apply {type(method).__name__} (stage {method.stage!r}) yet")
    return _load(PATCHERS[method.stage])(target, method)


def patch(target: Any, method: Any) -> PatchHandle:
    """Apply ``method`` to ``target`` (a model, or a tokenizer/processor for context pruning).

    ``method`` may be a list of methods (or :func:`compose`): they are ordered by stage and each is
    applied to the target it acts on; ``target`` is then one object or a tuple of them, e.g.
    ``tp.patch((processor, model), [tp.ContextPruner(), tp.DivPrune(64), tp.SnapKV(0.5)])``.

    Use as a context manager (``with tp.patch(model, method): model.generate(...)``) or keep the
    returned handle and call ``handle.remove()``. Removing restores every target exactly.

    Raises:
        TypeError: ``method`` is not a tokenprune method (or a list of them).
        ValueError: a composition is invalid (see :class:`tokenprune.Compose`) or lacks a target.
        NotImplementedError: the target's architecture is not supported by the method's stage.
    """
    method = _as_method(method)
    targets = list(target) if isinstance(target, (list, tuple)) else [target]
    if not isinstance(method, Compose) and len(method.components()) == 1:
        if len(targets) == 1:
            target = targets[0]  # (model,) as well as model
        else:
            found = _find(method.stage, targets)
            if found is None:
                raise ValueError(f"none of the targets can take {type(method).__name__} (stage {method.stage!r})")
            target = found
        return _patch_one(target, method)
    groups = _groups(targets, method)
    if len(groups) == 1:
        return _patch_one(*groups[0])
    handle = PatchHandle(tuple(t for t, _ in groups), method)
    try:
        for group_target, group_method in groups:
            sub = _patch_one(group_target, group_method)
            sub.stats = handle.stats  # one record list for the whole composition
            handle.on_remove(sub.remove)
    except BaseException:
        handle.remove()
        raise
    return handle


def compose(*methods: Any) -> Compose:
    """Several methods as one: ``tp.patch(model, tp.compose(tp.DivPrune(64), tp.SnapKV(0.5)))``, or as a
    decorator, ``@tp.compose(...)`` on ``model.generate`` or a function calling it (like :func:`prune`).

    Raises:
        TypeError / ValueError: as :class:`tokenprune.Compose` (two methods of one stage, conflicting stages).
    """
    if len(methods) == 1 and isinstance(methods[0], (list, tuple)):
        methods = tuple(methods[0])
    return Compose(tuple(methods))


def _default_target(args: tuple, kwargs: dict) -> Any:
    import torch

    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.nn.Module):
            return value
    return None


def _find_targets(method: Pruner, args: tuple, kwargs: dict) -> Any:
    """What ``prune`` patches for one call: the target of each stage among the call's arguments."""
    stages = [c.stage for c in method.components()]
    found = []
    for stage in dict.fromkeys("context" if s == "context" else "model" for s in stages):
        finder = TARGET_FINDERS.get("context") if stage == "context" else None
        obj = _load(finder)(args, kwargs) if finder else _default_target(args, kwargs)
        if obj is not None and obj not in found:
            found.append(obj)
    if not found:
        return None
    return found[0] if len(found) == 1 else tuple(found)


def prune(method: Any, target: Optional[Any] = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: run the decorated function with ``method`` applied, then restore.

    Works on a bound ``model.generate`` (the model is its ``__self__``) and on any function that
    calls ``generate``: the target is then ``target=`` or, among the call's arguments, the first
    ``torch.nn.Module`` (and for context pruning the tokenizer/processor). ``method`` may be a list of
    methods or :func:`compose`. The decorated function exposes the statistics of its last call as
    ``fn.last_stats``.
    """
    method = _as_method(method)

    def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
        bound_self = getattr(fn, "__self__", None)
        bound_name = getattr(fn, "__name__", None)

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            obj = target if target is not None else bound_self
            if obj is None:
                obj = _find_targets(method, args, kwargs)
            if obj is None:
                raise TypeError(
                    f"tp.prune could not find what to patch for {getattr(fn, '__name__', fn)!r}: decorate a bound "
                    "method such as model.generate, pass target=..., or pass the model as an argument"
                )
            with patch(obj, method) as handle:
                wrapper.last_stats = handle.stats
                # A bound method captured before patching would bypass instance-level overrides:
                # look it up again on the patched object.
                call = getattr(obj, bound_name) if obj is bound_self and bound_name else fn
                return call(*args, **kwargs)

        wrapper.last_stats = None
        return wrapper

    return decorator
