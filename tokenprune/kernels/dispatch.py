"""Choosing between a Triton kernel and its torch reference (``impl="auto" | "triton" | "torch"``)."""

from __future__ import annotations

import importlib.util
import os

import torch

_IMPLS = ("auto", "triton", "torch")


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_impl(impl: str, tensor: torch.Tensor) -> str:
    """Resolve ``impl`` to ``"triton"`` or ``"torch"`` for ``tensor``.

    ``"auto"`` picks Triton for CUDA tensors when triton is installed, torch otherwise.
    ``"triton"`` on a CPU tensor requires ``TRITON_INTERPRET=1`` (set before triton is imported).
    """
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}")
    if impl == "torch":
        return "torch"
    if impl == "auto":
        return "triton" if tensor.is_cuda and triton_available() else "torch"
    if not triton_available():
        raise RuntimeError("impl='triton' needs the triton package: pip install 'tokenprune[kernels]'")
    if not tensor.is_cuda and not interpreter_enabled():
        raise RuntimeError(
            "impl='triton' on a CPU tensor needs the Triton interpreter: set TRITON_INTERPRET=1 "
            "before importing triton, or use impl='torch'"
        )
    return "triton"
