"""Helpers shared by the kernel tests."""

from __future__ import annotations

import contextlib

import pytest
import torch

IMPLS = ["torch", pytest.param("triton", marks=pytest.mark.triton)]


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
