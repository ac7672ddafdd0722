"""Context pruning in front of Hugging Face chat templates (the ``documents=`` RAG convention).

``tp.patch(tokenizer_or_processor, tp.ContextPruner(...))`` overrides the instance's
``apply_chat_template`` so that its ``documents=`` are pruned against the conversation's last
user message before the prompt is built; leaving the ``with`` block (or ``handle.remove()``)
restores the original method exactly. ``tp.prune(pruner)(fn)`` does the same around any function
that receives the tokenizer or processor (or around ``tokenizer.apply_chat_template`` itself).

:func:`prune_documents` is the plain helper for users who build prompts themselves.

Batched conversations (a list of conversations) with ``documents=`` are supported with
``tokenize=False``: the template is applied per conversation with that conversation's pruned
documents (one batched scoring pass for all of them), and the list of prompts is returned.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional, Sequence

from tokenprune.methods.context import ContextPruner
from tokenprune.patching import PatchHandle, active_handle, install

__all__ = ["question_from_messages", "prune_documents", "patch_context", "find_target", "is_batch", "record"]


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):  # [{"type": "text", "text": ...}, {"type": "image"}, ...]
        return " ".join(
            part.get("text", "") for part in content if isinstance(part, Mapping) and part.get("type", "text") == "text"
        ).strip()
    return ""


def question_from_messages(messages: Any) -> str:
    """The text of the last user message of a conversation (the RAG question).

    Raises:
        ValueError: the conversation has no user message with text.
    """
    if isinstance(messages, str):
        return messages
    for message in reversed(list(messages or [])):
        if isinstance(message, Mapping) and message.get("role") == "user":
            text = _text_of(message.get("content"))
            if text:
                return text
    raise ValueError("cannot prune documents: the conversation has no user message with text (the question)")


def is_batch(conversation: Any) -> bool:
    return (
        isinstance(conversation, Sequence)
        and not isinstance(conversation, str)
        and len(conversation) > 0
        and isinstance(conversation[0], Sequence)
        and not isinstance(conversation[0], (str, Mapping))
    )


def prune_documents(
    pruner: ContextPruner, conversation: Any, documents: Sequence[Any], tokenizer: Any = None
) -> list[Any]:
    """Pruned ``documents`` (same types, in the pruner's output order) for one conversation
    (a list of messages) or a question string."""
    _check_pruner(pruner)
    result = pruner.prune(question_from_messages(conversation), list(documents), tokenizer=tokenizer)
    return result.passages


def _check_pruner(pruner: Any) -> None:
    if not isinstance(pruner, ContextPruner):
        raise TypeError(f"context pruning needs a tp.ContextPruner, got {type(pruner).__name__}")


def record(handle: Optional[PatchHandle], results: Sequence[Any]) -> None:
    if handle is None:
        return
    call = handle.stats.new_call()
    for row, result in enumerate(results):
        for d in result.details:
            kept = d.index in result.order
            handle.stats.add(
                call=call, row=row, image=d.index, kind="context",
                before=d.tokens_before if d.tokens_before is not None else d.chars_before,
                after=(d.tokens_after if d.tokens_after is not None else d.chars_after) if kept else 0,
            )


def patch_context(target: Any, method: ContextPruner) -> PatchHandle:
    """Patch a tokenizer/processor (``apply_chat_template``) or a vLLM ``LLM`` (``chat``).

    Statistics: ``handle.stats`` gets one record per passage and call (``row`` = conversation,
    ``image`` = passage index, tokens before/after counted with the target's tokenizer).
    """
    _check_pruner(method)
    if type(target).__module__.startswith("vllm"):
        from tokenprune.integrations.vllm_rag import patch_llm

        return patch_llm(target, method)
    original = getattr(target, "apply_chat_template", None)
    if not callable(original):
        raise NotImplementedError(
            f"context pruning patches a tokenizer or processor with apply_chat_template, or a vLLM LLM; "
            f"got {type(target).__name__}"
        )
    counter = getattr(target, "tokenizer", None) or target

    def apply_chat_template(conversation: Any, *args: Any, documents: Optional[Sequence[Any]] = None, **kwargs: Any):
        handle = active_handle(target)
        if not documents:
            return original(conversation, *args, documents=documents, **kwargs)
        if not is_batch(conversation):
            result = method.prune(question_from_messages(conversation), list(documents), tokenizer=counter)
            record(handle, [result])
            return original(conversation, *args, documents=result.passages, **kwargs)
        if kwargs.get("tokenize", True):
            raise NotImplementedError(
                "batched conversations with documents= are pruned per conversation: pass tokenize=False "
                "and tokenize the returned prompts, or call apply_chat_template once per conversation"
            )
        questions = [question_from_messages(c) for c in conversation]
        results = method.prune(questions, [list(documents) for _ in conversation], tokenizer=counter)
        record(handle, results)
        return [original(c, *args, documents=r.passages, **kwargs) for c, r in zip(conversation, results)]

    apply_chat_template.__wrapped__ = original
    return install(target, method, lambda handle: handle.set_attr(target, "apply_chat_template", apply_chat_template))


def find_target(args: tuple, kwargs: dict) -> Any:
    """``tp.prune`` target finder: the first argument that is a vLLM ``LLM`` or has
    ``apply_chat_template`` (a tokenizer or processor)."""
    for value in (*args, *kwargs.values()):
        if type(value).__module__.startswith("vllm") and hasattr(value, "chat"):
            return value
        if callable(getattr(value, "apply_chat_template", None)) and not isinstance(value, type):
            return value
    return None
