"""Helpers shared by the kernel tests."""

from __future__ import annotations

import contextlib

import pytest
import torch

from tokenprune.kernels.dispatch import interpreter_enabled

TRITON_RUNNABLE = interpreter_enabled() or torch.cuda.is_available()
requires_triton = pytest.mark.skipif(not TRITON_RUNNABLE, reason="Triton needs a GPU or TRITON_INTERPRET=1")
IMPLS = ["torch", pytest.param("triton", marks=[pytest.mark.triton, requires_triton])]


def device_for(impl: str) -> torch.device:
    """Where ``impl`` runs: Triton compiled on the GPU when there is one and the interpreter is off
    (``TRITON_INTERPRET=0 pytest ...``), everything else on CPU."""
    if impl == "triton" and not interpreter_enabled() and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def on(impl: str, *tensors):
    """``tensors`` moved to ``device_for(impl)`` (None stays None)."""
    device = device_for(impl)
    moved = tuple(None if t is None else t.to(device) for t in tensors)
    return moved if len(moved) > 1 else moved[0]


@contextlib.contextmanager
def poisoned_empty():
    """Make ``torch.empty`` / ``torch.empty_like`` return NaN (float) or -1 (integer) filled tensors,
    so a kernel that leaves an output element unwritten fails the comparison."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t: torch.Tensor) -> torch.Tensor:
        return t.fill_(float("nan") if t.is_floating_point() else -1)

    mp = pytest.MonkeyPatch()
    mp.setattr(torch, "empty", lambda *a, **kw: poison(real_empty(*a, **kw)))
    mp.setattr(torch, "empty_like", lambda *a, **kw: poison(real_empty_like(*a, **kw)))
    try:
        yield
    finally:
        mp.undo()
