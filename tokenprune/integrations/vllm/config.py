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

Every environment variable the vLLM side reads is read here (:func:`env_config`,
:func:`draft_tree_from_env`, :func:`draft_min_prob_from_env`, :func:`plugin_reach_problem`), and a
malformed value is a ``ValueError`` naming the variable and the expected form.

This module imports neither vLLM nor transformers: ``register()`` validates the environment with
it in every vLLM process before anything is patched, so a bad value never half-applies.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
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
    "config_source",
    "request_keep",
    "config_to_json",
    "DRAFT_TREE_ENV",
    "DRAFT_MIN_PROB_ENV",
    "env_config",
    "set_env_config",
    "draft_tree_from_env",
    "draft_min_prob_from_env",
    "plugin_reach_problem",
]

#: environment variable holding the JSON configuration.
ENV_VAR = "TOKENPRUNE_CONFIG"
#: environment variable holding the vLLM drafter's DraftTree arguments as JSON.
DRAFT_TREE_ENV = "TOKENPRUNE_DRAFT_TREE"
#: environment variable holding the drafter's smallest path probability worth proposing.
DRAFT_MIN_PROB_ENV = "TOKENPRUNE_DRAFT_MIN_PROB"
#: attribute of the HF config (set through ``hf_overrides``) holding the configuration.
HF_CONFIG_KEY = "tokenprune"
#: per-request ``mm_processor_kwargs`` key overriding the budget.
REQUEST_KEEP_KEY = "tokenprune_keep"
#: key of the configuration holding the context pruner's arguments (environment only).
CONTEXT_KEY = "context"
#: inputs beyond the post-projector features that some pruned vLLM model computes for methods that
#: declare them in ``requires`` (``ImageTokens`` attributes and ``extras`` keys); each model checks
#: its own subset at engine start (the vision tower's [CLS] / mean-query statistics).
PROVIDED_INPUTS = frozenset({"cls_attention", "grid", "keys", "flow_layers"})


def _visual_methods() -> list[str]:
    """Names of the visual methods vLLM can run (their ``requires`` within :data:`PROVIDED_INPUTS`)."""
    from tokenprune.methods.base import get_method_class

    return [n for n in available_methods() if get_method_class(n).stage == "visual"
            and set(get_method_class(n).requires) <= PROVIDED_INPUTS]


def _from_list(items: list, source: str) -> dict[str, Any]:
    """A composition (a list of method configurations or objects, as ``tp.patch`` takes) as the
    mapping form: the visual method's arguments at the top level, the context pruner's under
    ``"context"``. Stage conflicts are refused as :class:`tokenprune.Compose` refuses them."""
    from tokenprune.api import Compose

    methods = []
    for i, item in enumerate(items):
        if isinstance(item, Pruner):
            methods.append(item)
            continue
        if not isinstance(item, Mapping) or not isinstance(item.get("method"), str):
            raise ValueError(f'tokenprune: {source}[{i}] must be an object with a "method" name, such as '
                             f'{{"method": "divprune", "keep": 64}}, got {item!r}')
        arguments = dict(item)
        try:
            methods.append(build(arguments.pop("method"), **arguments))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"tokenprune: invalid {source}[{i}]: {exc}") from exc
    try:
        composed = Compose(tuple(methods))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"tokenprune: invalid {source}: {exc}") from exc
    mapping: dict[str, Any] = {}
    for method in composed.methods:
        if method.stage == "context":
            config = method.to_config()
            config.pop("method")
            mapping[CONTEXT_KEY] = config
        else:
            mapping.update(_check_runnable(method, source).to_config())
    return mapping


def _load_mapping(raw: Any, source: str) -> Optional[Mapping[str, Any]]:
    """``raw`` (JSON string, mapping, or a list of methods: a composition) as a mapping, ``None`` when empty."""
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return None
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ValueError(f"tokenprune: {source} is not valid JSON ({exc}): {raw!r}") from exc
    if getattr(raw, "stage", None) == "composite":  # a composition, or a multi-stage method (ToDRE)
        raw = list(getattr(raw, "methods", (raw,)))
    if isinstance(raw, (list, tuple)):
        return _from_list(list(raw), source)
    if not isinstance(raw, Mapping):
        raise ValueError(
            f"tokenprune: {source} must be a JSON object such as "
            f'{{"method": "divprune", "keep": 64}} (or a list of them), got {type(raw).__name__}'
        )
    return raw


def parse_context_config(raw: Any, source: str = ENV_VAR) -> Optional[dict[str, Any]]:
    """The :class:`~tokenprune.ContextPruner` arguments under ``"context"`` in ``raw`` (validated
    by building one, which is cheap: the scorer's model loads on first use), or ``None``.

    Raises:
        ValueError: malformed JSON, ``"context"`` not an object, or arguments the pruner rejects.
    """
    if isinstance(raw, Pruner) and raw.stage != "composite":
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
    from tokenprune.integrations.vllm.checks import check_context
    from tokenprune.methods.context import ContextPruner

    try:
        pruner = ContextPruner(**arguments)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"tokenprune: invalid {source}[{CONTEXT_KEY!r}]: {exc}") from exc
    check_context(pruner, f"{source}[{CONTEXT_KEY!r}]")
    return dict(arguments)


def parse_config(raw: Any, source: str = ENV_VAR) -> Optional[VisualPruner]:
    """The visual pruning method described by ``raw``, or ``None`` when ``raw`` is empty or
    configures context pruning only (``{"context": {...}}``, see :func:`parse_context_config`).

    Args:
        raw: a JSON string, a mapping ``{"method": name, **arguments}``, a :class:`Pruner`
            instance, a composition (a list of such mappings or methods, or ``tp.compose(...)``:
            at most one visual method and one context pruner), or ``None`` / ``""`` (not configured).
        source: where ``raw`` came from, used in error messages.

    Raises:
        ValueError: malformed JSON, unknown method or bad arguments (the method's own
            ``ValueError``/``TypeError`` is chained), or a method vLLM cannot run (in-LLM and KV
            pruning have no hook in vLLM; the message says why).
    """
    if isinstance(raw, Pruner) and raw.stage != "composite":
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
    if any(c.stage == "llm" for c in method.components()):
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
            f"integration does not compute (it provides: {', '.join(sorted(PROVIDED_INPUTS))}); "
            "run it with the Hugging Face integration (tp.patch(model, method))"
        )
    return method


def config_source(hf_config: Any) -> str:
    """Where one engine's configuration comes from, as error messages name it."""
    return f"hf_overrides[{HF_CONFIG_KEY!r}]" if getattr(hf_config, HF_CONFIG_KEY, None) is not None else ENV_VAR


def method_from_hf_config(hf_config: Any) -> Optional[VisualPruner]:
    """The method configured for one engine: ``hf_config.tokenprune`` (from ``hf_overrides``) if
    set, else the environment, else ``None``."""
    value = getattr(hf_config, HF_CONFIG_KEY, None)
    if value is not None:
        return parse_config(value, source=config_source(hf_config))
    return parse_config(env_config(), source=ENV_VAR)


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


# --------------------------------------------------------------------------- environment


def env_config() -> Optional[str]:
    """The raw ``TOKENPRUNE_CONFIG`` value, ``None`` when unset or blank."""
    return os.environ.get(ENV_VAR, "").strip() or None


def set_env_config(value: Optional[str]) -> Optional[str]:
    """Set ``TOKENPRUNE_CONFIG`` (``None``: unset it) for this process and its children; returns the
    previous value exactly as it was (``None`` when unset)."""
    previous = os.environ.get(ENV_VAR)
    if value is None:
        os.environ.pop(ENV_VAR, None)
    else:
        os.environ[ENV_VAR] = value
    return previous


def draft_tree_from_env() -> Any:
    """The :class:`~tokenprune.DraftTree` described by ``TOKENPRUNE_DRAFT_TREE`` (a JSON object of
    its arguments, ``"method"`` optional), or n-gram lookup when unset.

    Raises:
        ValueError: the value is not a JSON object of DraftTree arguments (the message names the
            variable, the expected form and the argument the method rejected).
    """
    raw = os.environ.get(DRAFT_TREE_ENV, "").strip()
    example = f'{DRAFT_TREE_ENV}=\'{{"sources": ["ngram"], "budget": 16}}\''
    if not raw:
        arguments: dict[str, Any] = {"sources": ["ngram"]}
    else:
        try:
            loaded = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ValueError(f"tokenprune: {DRAFT_TREE_ENV} is not valid JSON ({exc}): {raw!r}; expected e.g. {example}") from None
        if not isinstance(loaded, Mapping):
            raise ValueError(f"tokenprune: {DRAFT_TREE_ENV} must be a JSON object of tp.DraftTree arguments, "
                             f"got {type(loaded).__name__}; expected e.g. {example}")
        arguments = dict(loaded)
        name = arguments.pop("method", "draft_tree")
        if name != "draft_tree":
            raise ValueError(f"tokenprune: {DRAFT_TREE_ENV} configures the draft_tree method only, got method {name!r}")
    try:
        return build("draft_tree", **arguments)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"tokenprune: invalid {DRAFT_TREE_ENV}: {exc}") from exc


def draft_min_prob_from_env(default: float = 0.1) -> float:
    """``TOKENPRUNE_DRAFT_MIN_PROB`` as a probability in [0, 1] (``default`` when unset)."""
    raw = os.environ.get(DRAFT_MIN_PROB_ENV, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"tokenprune: {DRAFT_MIN_PROB_ENV} must be a number in [0, 1] such as 0.1, got {raw!r}") from None
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ValueError(f"tokenprune: {DRAFT_MIN_PROB_ENV} must be a number in [0, 1] such as 0.1, got {raw!r}")
    return value


def plugin_reach_problem() -> Optional[str]:
    """Why vLLM's spawned processes would not run the plugin's ``register()``, or ``None`` if they
    will (``VLLM_ENABLE_V1_MULTIPROCESSING=0`` keeps the engine in this process; otherwise the entry
    point must be installed and allowed by ``VLLM_PLUGINS``)."""
    if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1") == "0":
        return None
    allowed = os.environ.get("VLLM_PLUGINS")
    if allowed is not None and "tokenprune" not in [p.strip() for p in allowed.split(",")]:
        return f"VLLM_PLUGINS={allowed!r} does not allow the 'tokenprune' plugin"
    from importlib.metadata import entry_points

    if not any(ep.name == "tokenprune" for ep in entry_points(group="vllm.general_plugins")):
        return "the 'tokenprune' vllm.general_plugins entry point is not installed (pip install tokenprune[vllm])"
    return None
