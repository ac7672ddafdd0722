"""Context pruning in front of Hugging Face chat templates (the ``documents=`` RAG convention).

``tp.patch(tokenizer_or_processor, tp.ContextPruner(...))`` overrides the instance's
``apply_chat_template`` so that its ``documents=`` are pruned against the conversation's last
user message before the prompt is built; leaving the ``with`` block (or ``handle.remove()``)
restores the original method exactly. ``tp.prune(pruner)(fn)`` does the same around any function
that receives the tokenizer or processor (or around ``tokenizer.apply_chat_template`` itself).

:func:`tokenprune.integrations.chat.prune_documents` is the plain helper for users who build prompts
themselves.

Batched conversations (a list of conversations) with ``documents=`` are supported with
``tokenize=False``: the template is applied per conversation with that conversation's pruned
documents (one batched scoring pass for all of them), and the list of prompts is returned.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from tokenprune.integrations.chat import check_pruner, is_batch, question_from_messages, record
from tokenprune.methods.context import ContextPruner
from tokenprune.patching import PatchHandle, active_handle, install

__all__ = ["patch_tokenizer"]


def patch_tokenizer(target: Any, method: ContextPruner) -> PatchHandle:
    """Patch a tokenizer/processor's ``apply_chat_template`` (``tp.patch`` dispatches here through
    :mod:`tokenprune.integrations.context`).

    Statistics: ``handle.stats`` gets one record per passage and call (``row`` = conversation,
    ``image`` = passage index, tokens before/after counted with the target's tokenizer).
    """
    check_pruner(method)
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

