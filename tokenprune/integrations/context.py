"""``tp.patch`` / ``tp.prune`` for the context stage: pick the engine hook from the target.

A vLLM ``LLM`` gets its ``chat`` wrapped (:func:`tokenprune.integrations.vllm.context.patch_llm`);
a tokenizer or processor gets its ``apply_chat_template`` wrapped
(:func:`tokenprune.integrations.hf.rag.patch_tokenizer`). Both engine modules are imported only when
chosen, and neither imports this module.
"""

from __future__ import annotations

from typing import Any

from tokenprune.integrations.chat import check_pruner
from tokenprune.methods.context import ContextPruner
from tokenprune.patching import PatchHandle

__all__ = ["patch_context", "find_target"]


def _is_vllm_llm(value: Any) -> bool:
    return type(value).__module__.startswith("vllm") and callable(getattr(value, "chat", None))


def patch_context(target: Any, method: ContextPruner) -> PatchHandle:
    """Patch a tokenizer/processor (``apply_chat_template``) or a vLLM ``LLM`` (``chat``).

    Statistics: ``handle.stats`` gets one record per passage and call (``row`` = conversation,
    ``image`` = passage index, tokens before/after counted with the target's tokenizer).
    """
    check_pruner(method)
    if _is_vllm_llm(target):
        from tokenprune.integrations.vllm.context import patch_llm

        return patch_llm(target, method)
    from tokenprune.integrations.hf.rag import patch_tokenizer

    return patch_tokenizer(target, method)


def find_target(args: tuple, kwargs: dict) -> Any:
    """``tp.prune`` target finder: the first argument that is a vLLM ``LLM`` or has
    ``apply_chat_template`` (a tokenizer or processor)."""
    for value in (*args, *kwargs.values()):
        if _is_vllm_llm(value):
            return value
        if callable(getattr(value, "apply_chat_template", None)) and not isinstance(value, type):
            return value
    return None
