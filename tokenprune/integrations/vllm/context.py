"""Context pruning in front of vLLM: ``tp.patch(llm, pruner)`` and the server-wide configuration.

**Offline** ``LLM.chat(..., chat_template_kwargs={"documents": ...})``: vLLM renders the chat template
(with its ``documents``) in the front end before tokenisation, so pruning needs no engine hook:
``tp.patch(llm, pruner)`` (:func:`patch_llm`) wraps the instance's ``chat`` so every call is pruned;
removing the patch restores ``llm.chat`` exactly. vLLM's ``chat`` takes one ``chat_template_kwargs``
for all conversations of a call, while pruned documents differ per question: a batch of conversations
is therefore scored in one pass and then sent as one ``chat`` call per conversation (the engine still
batches the requests of each call).

**Server** (``TOKENPRUNE_CONFIG='{"context": {...}}'``, :func:`configure`):

vLLM 0.32 renders every chat request of an HF-tokenizer model with
``vllm.renderers.hf.safe_apply_chat_template``: ``HfRenderer.render_messages`` (offline
``LLM.chat``) looks it up as a module global at each call, and ``render_messages_async`` (the
OpenAI server) calls the ``make_async`` wrapper that ``HfRenderer.__init__`` binds to it. Replacing
the module attribute before the renderer is built (vLLM calls :func:`register` from ``EngineArgs``,
before the engine and its renderer exist) therefore covers both paths with one wrapper. It prunes
``documents`` against the last user message with
:func:`~tokenprune.integrations.chat.prune_chat_template_kwargs` before the template is
rendered and tokenised.

The :class:`~tokenprune.ContextPruner` is built on the first request that carries documents, so
processes that never render templates (engine core, workers) never load the scorer's model.
"""

from __future__ import annotations

import functools
import json
import threading
from typing import Any, Optional, Sequence

from tokenprune.integrations.chat import check_pruner, is_batch, prune_chat_template_kwargs, question_from_messages, record
from tokenprune.patching import PatchHandle, active_handle, install

__all__ = ["patch_llm", "configure", "current_pruner"]

_lock = threading.Lock()
# The applied "context" arguments (canonical JSON, or None when off) and the pruner built from them.
_state: dict[str, Any] = {"config": None, "pruner": None}


def configure(arguments: Optional[dict[str, Any]]) -> None:
    """Prune chat ``documents`` with ``ContextPruner(**arguments)`` from now on (``None``: stop).

    ``arguments`` must already be validated (:func:`~tokenprune.integrations.vllm.config.parse_context_config`).
    Installs the wrapper in ``vllm.renderers.hf`` once per process; it passes calls through while
    nothing is configured.
    """
    config = None if arguments is None else json.dumps(arguments, sort_keys=True)
    with _lock:
        if config != _state["config"]:
            _state["config"], _state["pruner"] = config, None
    if config is not None:
        _install()


def current_pruner() -> Optional[Any]:
    """The configured pruner, built on first call (``None`` when context pruning is off)."""
    with _lock:
        if _state["config"] is None:
            return None
        if _state["pruner"] is None:
            from tokenprune.methods.context import ContextPruner

            _state["pruner"] = ContextPruner(**json.loads(_state["config"]))
        return _state["pruner"]


def _install() -> None:
    import vllm.renderers.hf as hf

    original = hf.safe_apply_chat_template
    if getattr(original, "__tokenprune_context__", False):
        return

    @functools.wraps(original)
    def safe_apply_chat_template(model_config: Any, tokenizer: Any, conversation: Any, **kwargs: Any) -> Any:
        if kwargs.get("documents"):
            pruner = current_pruner()
            if pruner is not None:
                kwargs = prune_chat_template_kwargs(pruner, conversation, kwargs, tokenizer=tokenizer)
        return original(model_config, tokenizer, conversation, **kwargs)

    safe_apply_chat_template.__tokenprune_context__ = True
    hf.safe_apply_chat_template = safe_apply_chat_template


def patch_llm(llm: Any, pruner: Any) -> PatchHandle:
    """Wrap ``llm.chat`` so that ``chat_template_kwargs["documents"]`` is pruned per conversation."""
    check_pruner(pruner)
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
