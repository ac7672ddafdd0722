"""Engine-neutral helpers for chat conversations with RAG ``documents`` (the chat-template convention).

Both the Hugging Face hook (``apply_chat_template``) and the vLLM hooks (``LLM.chat`` and the server's
template renderer) prune a conversation's documents the same way: the question is the text of the last
user message, the documents are pruned by a :class:`~tokenprune.ContextPruner`, and the per-passage
token counts go into the patch handle's statistics. This module imports no engine.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional, Sequence

from tokenprune.methods.context import ContextPruner
from tokenprune.patching import PatchHandle

__all__ = ["question_from_messages", "is_batch", "check_pruner", "record", "prune_documents",
           "prune_chat_template_kwargs"]


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
    """Whether ``conversation`` is a list of conversations rather than one list of messages."""
    return (
        isinstance(conversation, Sequence)
        and not isinstance(conversation, str)
        and len(conversation) > 0
        and isinstance(conversation[0], Sequence)
        and not isinstance(conversation[0], (str, Mapping))
    )


def check_pruner(pruner: Any) -> None:
    if not isinstance(pruner, ContextPruner):
        raise TypeError(f"context pruning needs a tp.ContextPruner, got {type(pruner).__name__}")


def record(handle: Optional[PatchHandle], results: Sequence[Any]) -> None:
    """Add one statistics record per passage of each result (``row`` = conversation, ``image`` =
    passage index; tokens when the pruner counted them, else characters)."""
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


def prune_documents(
    pruner: ContextPruner, conversation: Any, documents: Sequence[Any], tokenizer: Any = None
) -> list[Any]:
    """Pruned ``documents`` (same types, in the pruner's output order) for one conversation
    (a list of messages) or a question string."""
    check_pruner(pruner)
    result = pruner.prune(question_from_messages(conversation), list(documents), tokenizer=tokenizer)
    return result.passages


def prune_chat_template_kwargs(
    pruner: ContextPruner, messages: Any, chat_template_kwargs: Optional[dict], tokenizer: Any = None
) -> Optional[dict]:
    """A copy of ``chat_template_kwargs`` whose ``"documents"`` are pruned against the last user
    message of ``messages`` (one conversation). Without documents the kwargs come back unchanged."""
    check_pruner(pruner)
    if not chat_template_kwargs or not chat_template_kwargs.get("documents"):
        return chat_template_kwargs
    result = pruner.prune(question_from_messages(messages), list(chat_template_kwargs["documents"]), tokenizer=tokenizer)
    return {**chat_template_kwargs, "documents": result.passages}
