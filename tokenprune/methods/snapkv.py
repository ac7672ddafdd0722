"""SnapKV: prompt KV-cache compression after prefill (Li et al., NeurIPS 2024, "SnapKV: LLM Knows
What You are Looking for Before Generation", arXiv 2404.14469).

After the prefill of each decoder layer, every prompt key outside the observation window is scored
by the attention the last ``window`` prompt queries pay it (softmax over the whole prompt, summed
over the window queries and averaged over the query heads sharing a KV head), smoothed with a 1-D
average pool of width ``kernel``; each KV head keeps its top ``keep - window`` keys plus the window
itself. Decoding runs on the compressed cache with the kept tokens' original positions. Published
defaults: window 32, kernel 5 (``init_snapkv``); kvpress uses window 64.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenprune.methods.base import TextPruner, register, resolve_keep, validate_keep


@register("snapkv")
@dataclass(frozen=True)
class SnapKV(TextPruner):
    """Args:
        keep: KV entries kept per layer and KV head: a count (>= 1) or a fraction in (0, 1] of the
            prompt; the window counts towards it.
        window: number of last prompt queries that vote (the observation window), >= 1.
        kernel: width of the average pooling over key positions, odd, >= 1.
        impl: ``attention_topk`` implementation, ``"auto"`` | ``"triton"`` | ``"torch"``.
    """

    keep: int | float = 0.5
    window: int = 32
    kernel: int = 5
    impl: str = "auto"

    def __post_init__(self) -> None:
        validate_keep(self.keep)
        for name in ("window", "kernel"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.kernel % 2 == 0:
            raise ValueError(f"kernel must be odd (centred pooling), got {self.kernel}")
        if self.impl not in ("auto", "triton", "torch"):
            raise ValueError(f"impl must be 'auto', 'triton' or 'torch', got {self.impl!r}")

    def num_kept(self, n: int) -> int:
        """KV entries kept out of a prompt of ``n`` tokens."""
        return resolve_keep(self.keep, n)
