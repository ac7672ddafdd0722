"""The vLLM plugin proper: ``register`` (the entry point), ``enable``/``disable`` and ``tokenprune_overrides``.

Installing ``tokenprune[vllm]`` declares the entry point
``vllm.general_plugins: tokenprune = tokenprune.integrations.vllm:register``; vLLM calls
:func:`register` in every process it starts (front end, engine core, workers, the model-inspection
subprocess). Configure it the vLLM way::

    TOKENPRUNE_CONFIG='{"method": "divprune", "keep": 64}' vllm serve llava-hf/llava-1.5-7b-hf

or per engine with ``hf_overrides`` (``LLM(..., hf_overrides=tokenprune_overrides(method))``),
or from Python with :func:`enable`. ``TOKENPRUNE_CONFIG`` may also hold
``"context": {...}`` (``tp.ContextPruner`` arguments): chat requests' ``documents`` are then
pruned in the front end before the chat template is rendered. One request can change its budget with
``mm_processor_kwargs={"tokenprune_keep": 32}``. See ``docs/vllm.md``.

This module imports vLLM only inside functions, and only when there is something to register.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any, Optional

from tokenprune.integrations.vllm.config import (
    CONTEXT_KEY,
    ENV_VAR,
    HF_CONFIG_KEY,
    REQUEST_KEEP_KEY,
    config_to_json,
    env_config,
    parse_config,
    parse_context_config,
    plugin_reach_problem,
    set_env_config,
)
from tokenprune.methods.base import Pruner, VisualPruner

__all__ = [
    "register",
    "enable",
    "disable",
    "tokenprune_overrides",
    "check_vllm_version",
    "SUPPORTED_VLLM",
    "PRUNED_ARCHITECTURES",
    "ENV_VAR",
    "HF_CONFIG_KEY",
    "REQUEST_KEEP_KEY",
]

logger = logging.getLogger(__name__)

#: vLLM versions whose internals this plugin was written and tested against (also the extra's pin).
SUPPORTED_VLLM = ">=0.32.0,<0.34"
_SUPPORTED_RANGE = ((0, 32), (0, 34))

_MODELS = "vllm.model_executor.models"
_OURS = "tokenprune.integrations.vllm"
#: HF architecture name -> (pruned class, vLLM's own class): overridden while TOKENPRUNE_CONFIG is set.
_OVERRIDES = {
    "LlavaForConditionalGeneration": (
        f"{_OURS}.llava:TokenpruneLlavaForConditionalGeneration",
        f"{_MODELS}.llava:LlavaForConditionalGeneration",
    ),
    "LlavaNextForConditionalGeneration": (
        f"{_OURS}.llava_next:TokenpruneLlavaNextForConditionalGeneration",
        f"{_MODELS}.llava_next:LlavaNextForConditionalGeneration",
    ),
    "Qwen2_5_VLForConditionalGeneration": (
        f"{_OURS}.qwen:TokenpruneQwen2_5_VLForConditionalGeneration",
        f"{_MODELS}.qwen2_5_vl:Qwen2_5_VLForConditionalGeneration",
    ),
    "Qwen2VLForConditionalGeneration": (
        f"{_OURS}.qwen:TokenpruneQwen2VLForConditionalGeneration",
        f"{_MODELS}.qwen2_vl:Qwen2VLForConditionalGeneration",
    ),
    "Qwen3VLForConditionalGeneration": (
        f"{_OURS}.qwen:TokenpruneQwen3VLForConditionalGeneration",
        f"{_MODELS}.qwen3_vl:Qwen3VLForConditionalGeneration",
    ),
}
#: opt-in architecture name -> pruned class; always registered, selects pruning for one engine.
PRUNED_ARCHITECTURES = {f"Tokenprune{arch}": pruned for arch, (pruned, _) in _OVERRIDES.items()}

# What this process has registered: None (nothing yet) or the TOKENPRUNE_CONFIG value applied.
_applied: dict[str, Optional[str]] = {"config": None, "registered": None}
_enabled_previous: list[Optional[str]] = []


def _vllm_version() -> str:
    import vllm

    return str(getattr(vllm, "__version__", "0"))


def check_vllm_version(strict: bool) -> bool:
    """Whether the installed vLLM is in :data:`SUPPORTED_VLLM`.

    Outside the range: ``RuntimeError`` when ``strict`` (pruning configured: the plugin patches
    processor/model internals that change between minor versions), otherwise a warning.
    """
    version = _vllm_version()
    try:
        parts = tuple(int(p) for p in version.split("+")[0].split(".")[:2])
    except ValueError:
        parts = (0, 0)
    low, high = _SUPPORTED_RANGE
    if low <= parts < high:
        return True
    message = (
        f"tokenprune's vLLM plugin supports vllm {SUPPORTED_VLLM} (found {version}); it overrides "
        "vLLM's multimodal processors, image-embedding steps and M-RoPE position hooks, whose "
        "internals change between versions"
    )
    if strict:
        raise RuntimeError(message + f". Unset {ENV_VAR} or install a supported vLLM.")
    logger.warning("%s", message)
    return False


def register() -> None:
    """The ``vllm.general_plugins`` entry point. Idempotent and cheap; safe to call many times.

    * Always makes the opt-in architecture names (:data:`PRUNED_ARCHITECTURES`) known to vLLM's
      model registry (lazily, as ``"module:Class"``); no existing architecture changes.
    * When ``TOKENPRUNE_CONFIG`` is set, validates it first (``ValueError`` naming the problem,
      raised before anything is registered, so vLLM's engine start fails with that message), checks
      the vLLM version, and registers the pruned classes under vLLM's architecture names
      (``LlavaForConditionalGeneration``, ``LlavaNextForConditionalGeneration``,
      ``Qwen2VLForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration``,
      ``Qwen3VLForConditionalGeneration``).
    * When it has a ``"context"`` entry, installs (once per process) the front-end wrapper that
      prunes the ``documents`` of chat requests (:mod:`tokenprune.integrations.vllm.context`).
    * When it is unset again (after :func:`disable`), vLLM's own classes are restored and context
      pruning stops.
    """
    _register(eager=False)


def _register(eager: bool) -> None:
    """``eager`` registers class objects (inspected in this process) instead of ``"module:Class"``
    strings (inspected in a subprocess that must be able to import tokenprune): :func:`enable` uses
    it so that an uninstalled checkout works with an in-process engine."""
    raw = env_config()
    method = parse_config(raw, source=ENV_VAR)
    context_arguments = parse_context_config(raw, source=ENV_VAR)
    mode = "eager" if eager else "lazy"
    if _applied["registered"] in (mode, "eager") and _applied["config"] == raw:
        return
    check_vllm_version(strict=method is not None or context_arguments is not None)
    if method is not None:
        from tokenprune.integrations.vllm.checks import check_method

        check_method(method, ENV_VAR)
    if context_arguments is not None or _applied["config"] is not None:
        from tokenprune.integrations.vllm.context import configure

        configure(context_arguments)
    from vllm import ModelRegistry

    def resolve(target: str) -> Any:
        if not eager:
            return target
        import importlib

        module, _, name = target.partition(":")
        return getattr(importlib.import_module(module), name)

    for arch, target in PRUNED_ARCHITECTURES.items():
        ModelRegistry.register_model(arch, resolve(target))
    if method is not None:
        for arch, (pruned, _) in _OVERRIDES.items():
            ModelRegistry.register_model(arch, resolve(pruned))
        logger.info("tokenprune: %s prunes the visual tokens of %s", method, ", ".join(_OVERRIDES))
    elif _applied["config"] is not None:
        for arch, (_, original) in _OVERRIDES.items():
            ModelRegistry.register_model(arch, original)
    # vLLM memoises model path + architecture -> class per process; an engine built before this
    # call must not hand its class to the next one.
    loader_utils = sys.modules.get("vllm.model_executor.model_loader.utils")
    if loader_utils is not None and _applied["config"] != raw:
        getattr(loader_utils, "_MODEL_ARCH_BY_HASH", {}).clear()
    _applied["config"] = raw
    _applied["registered"] = mode


def enable(method: Pruner | dict[str, Any] | str) -> VisualPruner:
    """Prune visual tokens in every vLLM engine this process (and its children) starts.

    Sets ``TOKENPRUNE_CONFIG`` (keeping a ``"context"`` entry already there) and calls
    :func:`register` here, so ``LLM(...)`` created afterwards serves pruned LLaVA. Returns the
    validated method. Undo with :func:`disable`.

    Raises:
        ValueError: the method is not one vLLM can run (see :func:`parse_config`).
        RuntimeError: vLLM's engine processes would not load the plugin (multiprocessing on and the
            entry point not installed, or ``VLLM_PLUGINS`` excluding it): they would serve the
            unpatched model against pruned prompts.
    """
    parsed = parse_config(method, source="enable()")
    if parsed is None:
        raise ValueError("enable() needs a method, e.g. tokenprune.DivPrune(keep=64)")
    problem = plugin_reach_problem()
    if problem is not None:
        raise RuntimeError(
            f"tokenprune: {problem}, so vLLM's engine processes would not load the plugin; install the "
            "package or set VLLM_ENABLE_V1_MULTIPROCESSING=0 (engine in this process)"
        )
    # Context pruning is configured in the environment only: keep an entry already there.
    context = parse_context_config(env_config(), source=ENV_VAR)
    value = config_to_json(parsed) if context is None else json.dumps({**parsed.to_config(), CONTEXT_KEY: context},
                                                                       sort_keys=True)
    _enabled_previous.append(set_env_config(value))
    try:
        _register(eager=True)
    except Exception:
        disable()
        raise
    return parsed


def disable() -> None:
    """Undo the last :func:`enable`: restore ``TOKENPRUNE_CONFIG`` and the model registry. Engines
    that already exist keep what they were built with. Without an :func:`enable` to undo it does
    nothing (a ``TOKENPRUNE_CONFIG`` the user set stays)."""
    if not _enabled_previous:
        return
    set_env_config(_enabled_previous.pop())
    _register(eager=True)


def tokenprune_overrides(
    method: Pruner | dict[str, Any] | str, architecture: str = "LlavaForConditionalGeneration"
) -> dict[str, Any]:
    """``hf_overrides`` that prune one engine without touching the environment::

        LLM(model, hf_overrides=tokenprune_overrides(tp.DivPrune(keep=64), "Qwen2_5_VLForConditionalGeneration"))

    ``architecture`` is the checkpoint's (``config.json``'s ``architectures[0]``). The plugin must be
    loaded in the engine's processes (installed entry point, or :func:`register` called here with
    ``VLLM_ENABLE_V1_MULTIPROCESSING=0``).

    Raises:
        ValueError: no method, a method vLLM cannot run, or an architecture the plugin does not prune.
    """
    parsed = parse_config(method, source="tokenprune_overrides()")
    if parsed is None:
        raise ValueError("tokenprune_overrides() needs a method, e.g. tokenprune.DivPrune(keep=64)")
    if architecture not in _OVERRIDES:
        raise ValueError(
            f"tokenprune_overrides(): architecture must be one of {', '.join(_OVERRIDES)}, got {architecture!r}"
        )
    return {"architectures": [f"Tokenprune{architecture}"], HF_CONFIG_KEY: parsed.to_config()}
