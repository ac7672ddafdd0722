"""Configurations the serving platform cannot run, rejected at engine start.

A value that is valid in general but cannot run *here* (a Triton kernel on a CPU engine, a context
scorer on a device the machine lacks, vision statistics under a compiled or data-parallel vision
tower, M-RoPE repair on a runner that has no hook for it) would otherwise fail on the first request
that reaches it: inside the engine core that kills the server (HTTP 500, then connection refused).
Each check here raises ``ValueError`` naming the key and the reason before the engine serves:

* :func:`check_method` runs in :func:`~tokenprune.integrations.vllm.register` (every vLLM process,
  from ``EngineArgs``, before any model loads) and when an engine resolves its method
  (``hf_overrides``);
* :func:`check_engine` runs when a pruned model is built (the worker, while the engine starts);
* :func:`check_context` runs when ``TOKENPRUNE_CONFIG['context']`` is parsed.

vLLM is imported inside the functions only.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import torch

from tokenprune.methods.base import Pruner

__all__ = ["check_method", "check_engine", "check_mrope_runner", "check_context", "STATISTICS"]

#: ``requires`` entries computed by hooks inside the vision tower.
STATISTICS = frozenset({"cls_attention", "keys", "flow_layers"})


def check_method(method: Pruner, source: str) -> None:
    """Options of ``method`` this platform cannot run: ``impl="triton"`` needs the triton package
    and either a CUDA/ROCm engine or the Triton interpreter (``TRITON_INTERPRET=1``, tests only)."""
    if getattr(method, "impl", None) != "triton":
        return
    from tokenprune.kernels.dispatch import interpreter_enabled, triton_available

    hint = "use \"impl\": \"auto\" (Triton on CUDA/ROCm, torch elsewhere) or \"torch\""
    if not triton_available():
        raise ValueError(f"tokenprune: {source}['impl'] = 'triton' needs the triton package, which is not installed; {hint}")
    from vllm.platforms import current_platform

    if not (current_platform.is_cuda_alike() or interpreter_enabled()):
        raise ValueError(
            f"tokenprune: {source}['impl'] = 'triton' cannot run on this {current_platform.device_type} engine: "
            f"tokenprune's Triton kernels need CUDA/ROCm tensors (or TRITON_INTERPRET=1, a slow test mode); {hint}"
        )


def check_engine(method: Pruner, vllm_config: Any, architecture: str) -> None:
    """Engine options that break the vision-tower statistics a method ``requires``.

    The statistics come from forward hooks on the tower's attention layers; a compiled tower
    (``compilation_config.compile_mm_encoder``) would run them once at trace time only, and a
    data-parallel tower (``mm_encoder_tp_mode="data"`` with tensor parallelism) shows each rank only
    its share of the images.
    """
    needed = sorted(set(getattr(method, "requires", ())) & STATISTICS)
    if not needed:
        return
    name = type(method).__name__
    if getattr(vllm_config.compilation_config, "compile_mm_encoder", False):
        raise ValueError(
            f"tokenprune: {name} needs {', '.join(needed)} from {architecture}'s vision tower, which "
            "compilation_config['compile_mm_encoder'] = True compiles (the statistics hooks would not run); "
            "turn it off or use a method without them (e.g. divprune)"
        )
    mm_config = vllm_config.model_config.multimodal_config
    sharded = getattr(vllm_config.parallel_config, "tensor_parallel_size", 1) > 1
    if sharded and mm_config is not None and getattr(mm_config, "mm_encoder_tp_mode", "weights") == "data":
        raise ValueError(
            f"tokenprune: {name} needs {', '.join(needed)} from {architecture}'s vision tower, which "
            "mm_encoder_tp_mode = 'data' shards across ranks by image; use mm_encoder_tp_mode='weights' or a "
            "method without them (e.g. divprune)"
        )


def check_mrope_runner(vllm_config: Any, architecture: str) -> None:
    """Where Qwen's kept tokens can get their original M-RoPE positions.

    The positions are repaired by the model runner's multimodal-pruning hook, which exists in vLLM's
    V1 runner (CUDA/ROCm, XPU, CPU) and Model Runner V2, and runs on the first pipeline stage only.
    """
    parallel = vllm_config.parallel_config
    if getattr(parallel, "pipeline_parallel_size", 1) > 1:
        raise ValueError(
            f"tokenprune: pruning {architecture} images needs pipeline_parallel_size = 1 (got "
            f"{parallel.pipeline_parallel_size}): vLLM repairs M-RoPE positions of pruned media on the first "
            "pipeline stage only, so later stages would use wrong positions; use tensor parallelism"
        )
    from vllm.platforms import current_platform

    if not (current_platform.is_cuda_alike() or current_platform.is_xpu() or current_platform.is_cpu()):
        raise ValueError(
            f"tokenprune: pruning {architecture} images needs the M-RoPE repair hook of vLLM's GPU/XPU/CPU model "
            f"runners; this {current_platform.device_type} platform's runner is not known to have it"
        )


def check_context(pruner: Any, source: str) -> None:
    """A :class:`~tokenprune.ContextPruner` whose scorer cannot load here: a device the machine
    lacks, a missing package, or a model directory that does not exist."""
    device = torch.device(pruner.device)  # a valid device string: ContextPruner checked it at construction
    if device.type != "cpu":
        backend = torch.backends.mps if device.type == "mps" else getattr(torch, device.type, None)
        available = getattr(backend, "is_available", None)
        if available is None or not available():
            raise ValueError(f"tokenprune: {source}['device'] = {pruner.device!r}, but this machine has no {device.type} device")
    if not isinstance(pruner.scorer, str):
        return
    package = {"bi-encoder": "sentence_transformers", "cross-encoder": "sentence_transformers"}.get(pruner.scorer)
    if package and importlib.util.find_spec(package) is None:
        raise ValueError(f"tokenprune: {source}['scorer'] = {pruner.scorer!r} needs {package}: pip install 'tokenprune[rag]'")
    if pruner.model is not None:
        if not os.path.isdir(pruner.model):
            raise ValueError(f"tokenprune: {source}['model'] = {pruner.model!r} is not a local directory")
    elif pruner.scorer == "bi-encoder":
        from tokenprune.methods.context.scorers.bi_encoder import default_model_path

        try:
            default_model_path()
        except ImportError as exc:
            raise ValueError(f"tokenprune: {source}: {exc}") from None
