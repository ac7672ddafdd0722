"""CDPruner: instruction-conditioned diversity by a determinantal point process (Zhang et al., 2025,
"Beyond Attention or Similarity: Maximizing Conditional Diversity for Token Pruning in MLLMs",
NeurIPS 2025, arXiv 2506.10967; public code Theia-4869/CDPruner).

For one image with post-projector features ``X`` ``[N, D]`` and an instruction embedded as ``T``
``[M, D]`` (``ImageTokens.extras["instruction"]``, provided by the adapter):

1. **Similarity** ``S_ij = cos(x_i, x_j)``.
2. **Relevance** ``r_i = mean_m cos(x_i, t_m)``, min-max normalised over the image's tokens as in the
   public code: ``r^_i = (r_i - min r + 1e-6) / (max r - min r)`` (the ``1e-6`` keeps the least
   relevant token's kernel row non-zero).
3. **Conditional kernel** ``L = diag(q) S diag(q)``. With ``theta=None`` (default) ``q = r^``, the
   public code's kernel (its LLaVA results). With ``theta`` in ``[0, 1)``, ``q = exp(alpha r^)``,
   ``alpha = theta / (2 (1 - theta))``: the relevance/diversity trade-off of Chen et al. (2018)
   that the public code leaves commented out and OpenVINO GenAI exposes as ``relevance_weight``
   (default 0.5); then ``log det L_S = 2 alpha sum_S r^ + log det S_S``, i.e.
   ``theta * relevance + (1 - theta) * diversity`` up to scale; ``theta=0`` is pure diversity.
4. **Greedy MAP** of the DPP: ``keep`` tokens maximising ``log det L_S`` one at a time
   (:func:`tokenprune.kernels.dpp.dpp_greedy_map`, incremental Cholesky, batched over images).
   Kept indices are returned ascending.

Where this follows the public code and where it deviates:

* Similarity on the post-projector features: as the public code and OpenVINO GenAI.
* Relevance. The public code (LLaVA only) loads CLIP's *text* tower and projection beside
  LLaVA, encodes the raw question with it and compares it to CLIP-projected patch features,
  negating the cosine (``(-relevance).mean``), a sign the authors found empirically for CLIP only
  (CDPruner issues #9, #14, #19). A Hugging Face LLaVA checkpoint ships no CLIP text tower, so
  here, on every architecture, the instruction is the prompt's text tokens embedded by the
  language model's input embedding table, the space the projector maps image tokens into, and
  the cosine is used with its natural sign. This is what OpenVINO GenAI does for Qwen2-VL /
  Qwen2.5-VL (``extract_text_features`` in ``vision_token_pruning_processor.cpp``: every prompt
  token outside the vision markers, positive cosine). The relevance formula is the public
  code's mean over the text vectors of the cosines (its CLIP text vector is one per 77-token
  chunk); OpenVINO GenAI averages the token embeddings first and takes one cosine, which differs
  only in each token embedding being normalised before the average here.
* The adapter cannot tell the question from the chat template, so template words ("USER:",
  "ASSISTANT:", a system prompt) are part of the instruction, as in OpenVINO GenAI; image
  placeholders, vision start/end markers and BOS/EOS/padding are not.
* LLaVA-NeXT: one DPP over the image's content tokens (base crop + unpadded grid) with ``keep``
  for the whole image; the public code runs one DPP per crop with ``keep`` per crop.
* Degenerate relevance (all tokens equally relevant, or an instruction with no text tokens):
  ``r^ = 1``, i.e. the DPP on ``S`` alone; the public formula divides by zero there.
* More tokens than the kernel's rank (or duplicates): the public loop divides by a zero gain;
  here exhausted tokens are filled in by relevance (see :mod:`tokenprune.kernels.dpp`).

No attention is needed, so any attention implementation works. The vLLM plugin does not provide
the instruction and refuses the method.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import ClassVar, Optional, Sequence

import torch

from tokenprune.kernels import dpp_greedy_map
from tokenprune.methods.base import ImageTokens, VisualPruner, register

#: ``ImageTokens.extras`` key of the instruction embedding ``[M, D]``.
INSTRUCTION = "instruction"


@register("cdpruner")
@dataclass(frozen=True)
class CDPruner(VisualPruner):
    """Args:
        keep: tokens kept per image (int >= 1) or fraction kept (float in (0, 1]).
        theta: ``None`` (the public code's ``q = r^``) or the relevance weight in ``[0, 1)`` of
            ``q = exp(theta / (2 (1 - theta)) * r^)``.
    """

    requires: ClassVar[frozenset[str]] = frozenset({INSTRUCTION})

    keep: int | float = 64
    theta: Optional[float] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        t = self.theta
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 <= t < 1.0):
            raise ValueError(f"theta must be None or a number in [0, 1), got {t!r}")

    def relevance(self, image: ImageTokens) -> torch.Tensor:
        """Min-max normalised relevance ``r^`` ``[N]`` (fp32) of each token to the instruction."""
        text = image.require(INSTRUCTION, type(self).__name__)
        feats = image.features
        if not isinstance(text, torch.Tensor) or text.dim() != 2 or text.shape[1] != feats.shape[1]:
            shape = tuple(text.shape) if isinstance(text, torch.Tensor) else type(text).__name__
            raise ValueError(
                f"{type(self).__name__} needs extras[{INSTRUCTION!r}] of shape [M, {feats.shape[1]}] "
                f"(the instruction's token embeddings), got {shape}"
            )
        n = feats.shape[0]
        if text.shape[0] == 0:
            return torch.ones(n, dtype=torch.float32, device=feats.device)
        x = torch.nn.functional.normalize(feats.float(), dim=-1)
        t = torch.nn.functional.normalize(text.to(feats.device).float(), dim=-1)
        raw = (x @ t.T).mean(dim=1)
        low, span = raw.min(), raw.max() - raw.min()
        if float(span) <= 1e-6:
            return torch.ones_like(raw)
        return (raw - low + 1e-6) / span

    def quality(self, image: ImageTokens) -> torch.Tensor:
        """Per-token quality ``q`` ``[N]`` of the conditional kernel ``diag(q) S diag(q)``."""
        r = self.relevance(image)
        if self.theta is None:
            return r
        return torch.exp(self.theta / (2.0 * (1.0 - self.theta)) * r)

    def select(self, image: ImageTokens) -> torch.Tensor:
        return self.select_batch([image])[0]

    def select_batch(self, images: Sequence[ImageTokens]) -> list[torch.Tensor]:
        result: list[Optional[torch.Tensor]] = [None] * len(images)
        groups: dict[int, list[int]] = defaultdict(list)
        for i, image in enumerate(images):
            n, k = image.num_tokens, self.num_kept(image.num_tokens)
            if k >= n:  # keep-all: every token, no instruction needed
                result[i] = torch.arange(n, device=image.features.device)
            else:
                groups[k].append(i)
        # One padded DPP per distinct budget (a fractional keep gives images of different sizes
        # different budgets).
        for k, members in groups.items():
            feats = [images[i].features for i in members]
            quality = [self.quality(images[i]) for i in members]
            longest = max(f.shape[0] for f in feats)
            x = feats[0].new_zeros(len(members), longest, feats[0].shape[1], dtype=torch.float32)
            q = x.new_zeros(len(members), longest)
            for j, (f, w) in enumerate(zip(feats, quality)):
                x[j, : f.shape[0]] = f.float()
                q[j, : f.shape[0]] = w
            lengths = torch.tensor([f.shape[0] for f in feats], device=x.device)
            picks = dpp_greedy_map(x, q, k, lengths=lengths)
            for j, i in enumerate(members):
                result[i] = torch.sort(picks[j]).values
        return result  # type: ignore[return-value]
