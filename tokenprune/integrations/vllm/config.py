"""Configuration of the vLLM plugin: parsed and validated with the same method dataclasses as HF.

Three sources, from the widest to the narrowest:

* the environment, ``TOKENPRUNE_CONFIG='{"method": "divprune", "keep": 64}'`` (every engine the
  process or its children start);
* ``hf_overrides={"tokenprune": {...}}`` on one engine (``LLM(...)`` / ``--hf-overrides``), which
  wins over the environment;
* per request, ``mm_processor_kwargs={"tokenprune_keep": 32}``, which changes only the budget.

The environment may also carry ``"context": {...}``, the arguments of a :class:`ContextPruner`
that prunes the ``documents`` of chat requests in the front end (:func:`parse_context_config`);
it stands alone or beside a visual ``"method"``.

This module imports neither vLLM nor transformers: ``register()`` validates the environment with
it in every vLLM process before anything is patched, so a bad value never half-applies.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping, Optional

from tokenprune.methods.base import Pruner, VisualPruner, available_methods, build, validate_keep

__all__ = [
    "ENV_VAR",
    "HF_CONFIG_KEY",
    "REQUEST_KEEP_KEY",
    "PROVIDED_INPUTS",
    "CONTEXT_KEY",
    "parse_config",
    "parse_context_config",
    "method_from_hf_config",
    "request_keep",
    "config_to_json",
]

#: environment variable holding the JSON configuration.
ENV_VAR = "TOKENPRUNE_CONFIG"
#: attribute of the HF config (set through ``hf_overrides``) holding the configuration.
HF_CONFIG_KEY = "tokenprune"
#: per-request ``mm_processor_kwargs`` key overriding the budget.
REQUEST_KEEP_KEY = "tokenprune_keep"
#: key of the configuration holding the context pruner's arguments (environment only).
CONTEXT_KEY = "context"
#: inputs beyond the post-projector features that the vLLM model side computes for methods that
#: declare them in ``requires`` (``ImageTokens`` attributes).
PROVIDED_INPUTS = frozenset({"cls_attention", "grid"})


def _visual_methods() -> list[str]:
    from tokenprune.methods.base import get_method_class

    return [n for n in available_methods() if get_method_class(n).stage == "visual"]


def _load_mapping(raw: Any, source: str) -> Optional[Mapping[str, Any]]:
    """``raw`` (JSON string or mapping) as a mapping, ``None`` when empty."""
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return None
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ValueError(f"tokenprune: {source} is not valid JSON ({exc}): {raw!r}") from exc
    if not isinstance(raw, Mapping):
        raise ValueError(
            f"tokenprune: {source} must be a JSON object such as "
            f'{{"method": "divprune", "keep": 64}}, got {type(raw).__name__}'
        )
    return raw


def parse_context_config(raw: Any, source: str = ENV_VAR) -> Optional[dict[str, Any]]:
    """The :class:`~tokenprune.ContextPruner` arguments under ``"context"`` in ``raw`` (validated
    by building one, which is cheap: the scorer's model loads on first use), or ``None``.

    Raises:
        ValueError: malformed JSON, ``"context"`` not an object, or arguments the pruner rejects.
    """
    if isinstance(raw, Pruner):
        return None
    mapping = _load_mapping(raw, source)
    if mapping is None or mapping.get(CONTEXT_KEY) is None:
        return None
    arguments = mapping[CONTEXT_KEY]
    if not isinstance(arguments, Mapping):
        raise ValueError(
            f"tokenprune: {source}[{CONTEXT_KEY!r}] must be an object of tp.ContextPruner arguments such as "
            f'{{"scorer": "bi-encoder", "threshold": 0.575}}, got {type(arguments).__name__}'
        )
    from tokenprune.methods.context import ContextPruner

    try:
        ContextPruner(**arguments)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"tokenprune: invalid {source}[{CONTEXT_KEY!r}]: {exc}") from exc
    return dict(arguments)


def parse_config(raw: Any, source: str = ENV_VAR) -> Optional[VisualPruner]:
    """The visual pruning method described by ``raw``, or ``None`` when ``raw`` is empty or
    configures context pruning only (``{"context": {...}}``, see :func:`parse_context_config`).

    Args:
        raw: a JSON string, a mapping ``{"method": name, **arguments}``, a :class:`Pruner`
            instance, or ``None`` / ``""`` (not configured).
        source: where ``raw`` came from, used in error messages.

    Raises:
        ValueError: malformed JSON, unknown method or bad arguments (the method's own
            ``ValueError``/``TypeError`` is chained), or a method vLLM cannot run (in-LLM and KV
            pruning have no hook in vLLM; the message says why).
    """
    if isinstance(raw, Pruner):
        method = raw
    else:
        mapping = _load_mapping(raw, source)
        if mapping is None:
            return None
        arguments = dict(mapping)
        if CONTEXT_KEY in arguments:
            if source != ENV_VAR:
                # the front-end hook is process-wide; enable()/hf_overrides configure visual pruning
                raise ValueError(
                    f"tokenprune: {source} cannot configure context pruning; put "
                    f'"{CONTEXT_KEY}" in {ENV_VAR} (or use tp.patch(llm, tp.ContextPruner(...)))'
                )
            arguments.pop(CONTEXT_KEY)
            if not arguments:
                return None
        name = arguments.pop("method", None)
        if not isinstance(name, str):
            raise ValueError(
                f"tokenprune: {source} needs a \"method\" name; visual methods vLLM can run: "
                f"{', '.join(_visual_methods())}"
            )
        try:
            method = build(name, **arguments)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"tokenprune: invalid {source}: {exc}") from exc
    return _check_runnable(method, source)


def _check_runnable(method: Pruner, source: str) -> VisualPruner:
    if method.stage == "llm":
        raise ValueError(
            f"tokenprune: {source} names {type(method).__name__}, which prunes inside the language "
            "model; vLLM has no hook for that (RoPE positions, KV slots and sequence lengths are one "
            "per-request counter, sized before the model runs), so in-LLM and KV-cache pruning only "
            f"work with the Hugging Face integration. Visual methods for vLLM: {', '.join(_visual_methods())}"
        )
    if not isinstance(method, VisualPruner):
        raise ValueError(
            f"tokenprune: {source} names {type(method).__name__} (stage {method.stage!r}); the vLLM "
            f"plugin runs visual pruning methods only: {', '.join(_visual_methods())}"
        )
    missing = set(method.requires) - PROVIDED_INPUTS
    if missing:
        raise ValueError(
            f"tokenprune: {type(method).__name__} needs {', '.join(sorted(missing))}, which the vLLM "
            f"integration does not compute (it provides: {', '.join(sorted(PROVIDED_INPUTS))})"
        )
    return method


def method_from_hf_config(hf_config: Any, environ: Mapping[str, str]) -> Optional[VisualPruner]:
    """The method configured for one engine: ``hf_config.tokenprune`` (from ``hf_overrides``) if
    set, else the environment, else ``None``."""
    value = getattr(hf_config, HF_CONFIG_KEY, None)
    if value is not None:
        return parse_config(value, source=f"hf_overrides[{HF_CONFIG_KEY!r}]")
    return parse_config(environ.get(ENV_VAR), source=ENV_VAR)


def request_keep(method: VisualPruner, mm_kwargs: Mapping[str, object]) -> VisualPruner:
    """``method`` with the budget of one request (``mm_processor_kwargs["tokenprune_keep"]``)."""
    keep = mm_kwargs.get(REQUEST_KEEP_KEY)
    if keep is None:
        return method
    validate_keep(keep, name=f"mm_processor_kwargs[{REQUEST_KEEP_KEY!r}]")
    return dataclasses.replace(method, keep=keep)


def config_to_json(method: VisualPruner) -> str:
    """The JSON form of ``method`` accepted by :func:`parse_config`."""
    return json.dumps(method.to_config(), sort_keys=True)
