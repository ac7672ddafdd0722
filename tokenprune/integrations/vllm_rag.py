"""Context pruning in front of vLLM's ``LLM.chat(..., chat_template_kwargs={"documents": ...})``.

vLLM renders the chat template (with its ``documents``) in the front end before tokenisation, so
pruning needs no engine hook: :func:`prune_chat_template_kwargs` returns the kwargs with pruned
documents, and ``tp.patch(llm, pruner)`` (:func:`patch_llm`) wraps the instance's ``chat`` so
every call is pruned; removing the patch restores ``llm.chat`` exactly.

vLLM's ``chat`` takes one ``chat_template_kwargs`` for all conversations of a call, while pruned
documents differ per question: a batch of conversations is therefore scored in one pass and then
sent as one ``chat`` call per conversation (the engine still batches the requests of each call).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from tokenprune.integrations.hf.rag import is_batch, question_from_messages, record
from tokenprune.methods.context import ContextPruner
from tokenprune.patching import PatchHandle, active_handle, install

__all__ = ["prune_chat_template_kwargs", "patch_llm"]


def prune_chat_template_kwargs(
    pruner: ContextPruner, messages: Any, chat_template_kwargs: Optional[dict], tokenizer: Any = None
) -> Optional[dict]:
    """A copy of ``chat_template_kwargs`` whose ``"documents"`` are pruned against the last user
    message of ``messages`` (one conversation). Without documents the kwargs come back unchanged."""
    if not isinstance(pruner, ContextPruner):
        raise TypeError(f"context pruning needs a tp.ContextPruner, got {type(pruner).__name__}")
    if not chat_template_kwargs or not chat_template_kwargs.get("documents"):
        return chat_template_kwargs
    result = pruner.prune(question_from_messages(messages), list(chat_template_kwargs["documents"]), tokenizer=tokenizer)
    return {**chat_template_kwargs, "documents": result.passages}


def patch_llm(llm: Any, pruner: ContextPruner) -> PatchHandle:
    """Wrap ``llm.chat`` so that ``chat_template_kwargs["documents"]`` is pruned per conversation."""
    original = getattr(llm, "chat", None)
    if not callable(original):
        raise NotImplementedError(f"expected a vllm.LLM with a chat method, got {type(llm).__name__}")

    def chat(messages: Any, *args: Any, chat_template_kwargs: Optional[dict] = None, **kwargs: Any):
        documents: Sequence[Any] = (chat_template_kwargs or {}).get("documents") or []
        if not documents:
            return original(messages, *args, chat_template_kwargs=chat_template_kwargs, **kwargs)
        tokenizer = llm.get_tokenizer()
        conversations = list(messages) if is_batch(messages) else [messages]
        results = pruner.prune(
            [question_from_messages(c) for c in conversations], [list(documents) for _ in conversations],
            tokenizer=tokenizer,
        )
        record(active_handle(llm), results)
        outputs = []
        for conversation, result in zip(conversations, results):
            outputs += original(
                conversation, *args, chat_template_kwargs={**chat_template_kwargs, "documents": result.passages}, **kwargs
            )
        return outputs

    chat.__wrapped__ = original
    return install(llm, pruner, lambda handle: handle.set_attr(llm, "chat", chat))
