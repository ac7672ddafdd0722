"""``tp.patch`` for Hugging Face models: pick the adapter, then the installer of the method's stage."""

from __future__ import annotations

import importlib
from typing import Any

from tokenprune.methods.base import Pruner
from tokenprune.patching import PatchHandle, install

# stage -> "module:function(handle, adapter, method)" that applies a method of that stage.
STAGE_INSTALLERS: dict[str, str] = {
    "visual": "tokenprune.integrations.hf.visual:install",
    "llm": "tokenprune.integrations.hf.inllm:install",
    "text": "tokenprune.integrations.hf.text:install",
}


def patch_model(model: Any, method: Pruner) -> PatchHandle:
    """Apply ``method`` to a transformers model; see :func:`tokenprune.patch`."""
    from tokenprune.integrations.hf.adapters import architectures_for_stage, get_adapter

    adapter = get_adapter(model)
    if method.stage not in adapter.stages or method.stage not in STAGE_INSTALLERS:
        raise NotImplementedError(
            f"{type(method).__name__} (stage {method.stage!r}) cannot be applied to {type(model).__name__}, "
            f"which supports stages: {', '.join(sorted(adapter.stages)) or 'none'}; architectures supporting "
            f"stage {method.stage!r}: {', '.join(architectures_for_stage(method.stage)) or 'none'}"
        )
    module, _, name = STAGE_INSTALLERS[method.stage].partition(":")
    installer = getattr(importlib.import_module(module), name)
    return install(model, method, lambda handle: installer(handle, adapter, method))
