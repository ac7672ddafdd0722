"""``tp.patch`` (context manager / handle) and ``tp.prune`` (decorator): the user-facing hooks.

Which integration patches a target is decided by the method's ``stage``; integrations are imported
lazily so that ``import tokenprune`` needs torch only.
"""

from __future__ import annotations

import functools
import importlib
from typing import Any, Callable, Optional

from tokenprune.methods.base import Pruner
from tokenprune.patching import PatchHandle

# stage -> "module:function" that patches a target for that stage and returns a PatchHandle.
PATCHERS: dict[str, str] = {
    "visual": "tokenprune.integrations.hf.model:patch_model",
    "llm": "tokenprune.integrations.hf.model:patch_model",
    "text": "tokenprune.integrations.hf.model:patch_model",
    "speculative": "tokenprune.integrations.hf.speculative:patch_model",
    "context": "tokenprune.integrations.context:patch_context",
}

# stage -> "module:function(args, kwargs) -> target or None" used by ``prune`` to find the object
# to patch among a decorated function's arguments (default: the first torch.nn.Module).
TARGET_FINDERS: dict[str, str] = {}
TARGET_FINDERS["context"] = "tokenprune.integrations.context:find_target"


def _load(ref: str) -> Callable[..., Any]:
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


def patch(target: Any, method: Pruner) -> PatchHandle:
    """Apply ``method`` to ``target`` (a model, or a tokenizer/processor for context pruning).

    Use as a context manager (``with tp.patch(model, method): model.generate(...)``) or keep the
    returned handle and call ``handle.remove()``. Removing restores the target exactly.

    Raises:
        TypeError: ``method`` is not a tokenprune method.
        NotImplementedError: the target's architecture is not supported by the method's stage.
    """
    if isinstance(method, str):
        raise TypeError(f"method must be a tokenprune method object; build one with tp.build({method!r}, ...)")
    if not isinstance(method, Pruner):
        raise TypeError(f"method must be a tokenprune method (e.g. tp.DivPrune(keep=64)), got {type(method).__name__}")
    if method.stage not in PATCHERS:
        raise NotImplementedError(f"no integration can apply {type(method).__name__} (stage {method.stage!r}) yet")
    return _load(PATCHERS[method.stage])(target, method)


def _default_target(args: tuple, kwargs: dict) -> Any:
    import torch

    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.nn.Module):
            return value
    return None


def prune(method: Pruner, target: Optional[Any] = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: run the decorated function with ``method`` applied, then restore.

    Works on a bound ``model.generate`` (the model is its ``__self__``) and on any function that
    calls ``generate``: the target is then ``target=`` or the first ``torch.nn.Module`` among the
    call's arguments. The decorated function exposes the statistics of its last call as
    ``fn.last_stats``.
    """
    if not isinstance(method, Pruner):
        raise TypeError(f"method must be a tokenprune method (e.g. tp.DivPrune(keep=64)), got {type(method).__name__}")

    def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
        bound_self = getattr(fn, "__self__", None)
        bound_name = getattr(fn, "__name__", None)

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            obj = target if target is not None else bound_self
            if obj is None:
                finder = TARGET_FINDERS.get(method.stage)
                obj = _load(finder)(args, kwargs) if finder else _default_target(args, kwargs)
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
