"""``tp.patch`` for Hugging Face models: pick the adapter, then the installer of each method's stage.

Pre-LLM methods wrap ``generate``/``forward`` (:mod:`~tokenprune.integrations.hf.visual`); the
decoder stages (``"llm"``, ``"prompt"``, ``"kv"``) share one runtime
(:mod:`~tokenprune.integrations.hf.decoder`), so a sequence policy and a KV policy composed on one
model agree on every layer's slots and masks.
"""

from __future__ import annotations

import functools
from typing import Any

from tokenprune.methods.base import DECODER_STAGES, Pruner
from tokenprune.patching import PatchHandle, install

__all__ = ["patch_model", "MODEL_STAGES"]

#: stages a Hugging Face model patch applies, in the order they act on a call.
MODEL_STAGES = ("visual", *DECODER_STAGES)


def patch_model(model: Any, method: Pruner) -> PatchHandle:
    """Apply ``method`` — one method, or a :class:`tokenprune.Compose` or multi-stage method (stage
    ``"composite"``) whose components are ordered and checked — to a transformers model; see
    :func:`tokenprune.patch`."""
    from tokenprune.integrations.hf.adapters import architectures_for_stage, get_adapter

    methods = list(method.components())
    adapter = get_adapter(model)
    for m in methods:
        if m.stage not in adapter.stages or m.stage not in MODEL_STAGES:
            raise NotImplementedError(
                f"{type(m).__name__} (stage {m.stage!r}) cannot be applied to {type(model).__name__}, "
                f"which supports stages: {', '.join(sorted(adapter.stages)) or 'none'}; architectures supporting "
                f"stage {m.stage!r}: {', '.join(architectures_for_stage(m.stage)) or 'none'}"
            )
    visual = [m for m in methods if m.stage == "visual"]
    decoder = [m for m in methods if m.stage in DECODER_STAGES]

    def apply(handle: PatchHandle) -> None:
        if visual:
            from tokenprune.integrations.hf.visual import install as install_visual

            install_visual(handle, adapter, visual[0])
        if decoder:
            from tokenprune.integrations.hf.decoder import install as install_decoder

            install_decoder(handle, adapter, decoder)
        if len(methods) > 1:
            _scope_calls(handle, model)

    return install(model, method, apply)


def _scope_calls(handle: PatchHandle, model: Any) -> None:
    """Outermost ``generate``/``forward`` wrappers: every stage of one call records under one number."""
    for name in ("generate", "forward"):
        inner = getattr(model, name)

        def scoped(*args: Any, _inner=inner, **kwargs: Any) -> Any:
            with handle.stats.scope():
                return _inner(*args, **kwargs)

        handle.set_attr(model, name, functools.wraps(inner)(scoped))
