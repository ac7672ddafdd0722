"""vLLM integration: every piece of tokenprune that runs inside or in front of vLLM.

* :mod:`~tokenprune.integrations.vllm.plugin`: the ``vllm.general_plugins`` entry point
  (``tokenprune.integrations.vllm:register``), :func:`enable` / :func:`disable`,
  :func:`tokenprune_overrides`;
* :mod:`~tokenprune.integrations.vllm.config`: configuration parsing and every environment
  variable the vLLM side reads;
* :mod:`~tokenprune.integrations.vllm.common`, :mod:`~tokenprune.integrations.vllm.llava`,
  :mod:`~tokenprune.integrations.vllm.llava_next`, :mod:`~tokenprune.integrations.vllm.qwen`: pre-LLM
  visual pruning (LLaVA-1.5, LLaVA-NeXT, Qwen2-VL / Qwen2.5-VL / Qwen3-VL);
* :mod:`~tokenprune.integrations.vllm.checks`: options the platform cannot run, rejected at engine start;
* :mod:`~tokenprune.integrations.vllm.context`: context pruning of chat ``documents``
  (``tp.patch(llm, ContextPruner(...))`` and the server-wide ``"context"`` configuration);
* :mod:`~tokenprune.integrations.vllm.spec`: the ``custom_class`` speculative drafter
  (``TreeDrafter``).

Importing this package imports neither vLLM nor transformers. See ``docs/vllm.md``.
"""

from tokenprune.integrations.vllm.config import ENV_VAR, HF_CONFIG_KEY, REQUEST_KEEP_KEY
from tokenprune.integrations.vllm.plugin import (
    PRUNED_ARCHITECTURES,
    SUPPORTED_VLLM,
    check_vllm_version,
    disable,
    enable,
    register,
    tokenprune_overrides,
)

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
