"""ToDRE: two-stage visual token pruning by token diversity, then task relevance (Li, Yang, Zhang,
Shao, Lu, "ToDRE: Effective Visual Token Pruning via Token Diversity and Task Relevance", arXiv
2505.18757 v2, 2025; v1: "ToDRE: Visual Token Pruning via Diversity and Task Awareness for Efficient
Large Vision-Language Models").

**Stage 1, diversity (pre-LLM, per image).** A greedy diversification over the image's
post-projector embeddings ``x_1..x_N`` (``[N, D]``) keeps ``k`` tokens:

1. *pivot*: the token with the highest [CLS] attention at the vision feature layer (for an
   any-resolution image, LLaVA-NeXT, taken from the global thumbnail, the base crop);
2. *greedy max-sum diversification* (v2, the default): repeatedly add the token whose summed cosine
   similarity to the tokens kept so far is smallest, ``c_t = argmin_v sum_{c in C} cos(x_v, x_c)``,
   i.e. the largest sum of distances ``1 - cos``; ``objective="k_center"`` is v1's greedy k-center
   (farthest point: the smallest *largest* similarity to the kept set).

**Stage 2, relevance (inside the decoder, per row).** At decoder layer ``l`` (default ``floor(7L/8)``
of ``L`` layers, where the paper sees "information migration": cross-modal attention has faded) two
ratios of that layer's softmax attention, averaged over heads and query tokens, are measured::

    alpha_t->v = mean_{i in T} sum_{j in V} A_ij      alpha_v->t = mean_{i in V} sum_{j in T} A_ij

with ``V`` the row's image tokens (what stage 1 kept), ``T`` its text tokens after the first image
(the instruction and the generation prompt) and the system prompt ``S`` before it. When both are
below ``threshold`` (tau = 0.10) **every** visual token of the row is dropped: layers ``> l`` (and
the decoding steps) run on the text alone. Otherwise the row keeps them all. The attention comes from
layer ``l``'s own queries and post-RoPE keys (:meth:`DecoderView.attention_from`), so every layer
keeps SDPA/flash attention. Kept tokens keep their original positions.

``tp.patch(model, tp.ToDRE(...))`` installs the two stages as a composition
(:meth:`ToDRE.components`): :class:`ToDREDiversity` (stage ``"visual"``) and
:class:`ToDRERelevance` (stage ``"llm"``), so ToDRE composes with context and KV methods, and is
refused beside another pre-LLM or in-LLM method.

Paper defaults followed: 10% of each image's tokens kept by stage 1 (``keep=0.1``; 288 of
LLaVA-NeXT's 2,880), [CLS] pivot, cosine similarity, max-sum objective, the layer at 7L/8, tau = 0.10,
both ratios required below tau, all visual tokens removed at once. Deviations (docs/visual_methods.md):

* ``layer`` follows FastV's convention here: it is the first layer *without* visual tokens, so the
  ratios come from layer ``layer - 1``; the default is ``floor(7L/8) + 1`` (the ratios at 0-based
  layer ``floor(7L/8)``: 28 of 32 for 7B), capped at ``L - 1`` for very shallow decoders.
* Qwen2-VL / Qwen2.5-VL encoders have no [CLS]; the adapter's mean-query attention at the last
  vision block stands in (the paper suggests a random pivot there, which its ablation finds on par;
  ``pivot="center"`` / ``"farthest"`` are the paper's deterministic alternatives).
* Several images per row: stage 1 keeps ``keep`` of each image; stage 2 decides per row with ``V``
  = all the row's image tokens. A row with no text after its first image is never dropped (no text
  query to measure relevance with).
* Under causal attention, image tokens cannot attend to the text that follows them, so for an
  image-first prompt ``alpha_v->t`` is 0 and the decision rests on ``alpha_t->v``; both are computed
  as the paper defines them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Sequence

import torch

from tokenprune.methods.base import (
    DecoderView,
    ImageTokens,
    Pruner,
    SequencePruner,
    VisualPruner,
    register,
)

OBJECTIVES = ("max_sum", "k_center")
PIVOTS = ("cls", "center", "farthest")
IMPLS = ("auto", "triton", "torch")


def _check_choice(value: Any, name: str, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, one of {', '.join(map(repr, choices))}; got {type(value).__name__}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def _check_layer(layer: Any) -> None:
    if layer is None:
        return
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise TypeError(f"layer must be an int or None (7L/8 of the decoder's L layers), got {type(layer).__name__}")
    if layer < 1:
        raise ValueError(f"layer must be >= 1 (the relevance ratios come from layer - 1), got {layer}")


def _check_threshold(threshold: Any) -> None:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise TypeError(f"threshold must be a float in [0, 1], got {type(threshold).__name__}")
    if not (math.isfinite(threshold) and 0.0 <= threshold <= 1.0):
        raise ValueError(f"threshold must be in [0, 1] (0 never drops a row's visual tokens), got {threshold}")


def diverse_select(features: Sequence[torch.Tensor], ks: Sequence[int], pivots: Sequence[int],
                   objective: str = "max_sum") -> list[torch.Tensor]:
    """Greedy diversification of several images at once, from a pivot token each.

    Args:
        features: one ``[N_i, D]`` tensor per image.
        ks: tokens kept per image (``0 <= k_i``; capped at ``N_i``).
        pivots: first kept token of each image (``0 <= p_i < N_i``).
        objective: ``"max_sum"`` (next = smallest summed cosine similarity to the kept set) or
            ``"k_center"`` (next = smallest maximum similarity). Ties go to the lowest index.

    Returns:
        One LongTensor ``[min(k_i, N_i)]`` per image: the kept indices, ascending.
    """
    if not features:
        return []
    device = features[0].device
    sizes = [int(f.shape[0]) for f in features]
    counts = [min(int(k), n) for k, n in zip(ks, sizes)]
    steps = max(counts)
    if steps == 0:
        return [torch.empty(0, dtype=torch.long, device=device) for _ in features]
    g, width = len(features), max(sizes)
    x = torch.zeros(g, width, features[0].shape[1], dtype=torch.float32, device=device)
    taken = torch.ones(g, width, dtype=torch.bool, device=device)  # padding counts as taken
    for i, f in enumerate(features):
        x[i, : sizes[i]] = torch.nn.functional.normalize(f.float(), dim=-1)
        taken[i, : sizes[i]] = False
    rows = torch.arange(g, device=device)
    picked = torch.empty(g, steps, dtype=torch.long, device=device)
    picked[:, 0] = torch.tensor([int(p) if n else 0 for p, n in zip(pivots, sizes)], device=device)
    # similarity[i, v]: summed (max_sum) or largest (k_center) cosine similarity of token v to the kept set
    similarity = torch.einsum("gnd,gd->gn", x, x[rows, picked[:, 0]])
    taken[rows, picked[:, 0]] = True
    for t in range(1, steps):
        picked[:, t] = similarity.masked_fill(taken, float("inf")).argmin(dim=1)
        taken[rows, picked[:, t]] = True
        new = torch.einsum("gnd,gd->gn", x, x[rows, picked[:, t]])
        similarity = similarity + new if objective == "max_sum" else torch.maximum(similarity, new)
    return [torch.sort(picked[i, : counts[i]]).values for i in range(g)]


@dataclass(frozen=True)
class ToDREDiversity(VisualPruner):
    """ToDRE's stage 1 (pre-LLM): a pivot, then greedy max-sum (or k-center) diversification of each
    image's ``[N, D]`` post-projector embeddings down to ``keep`` tokens. Applied by :class:`ToDRE`.

    Args:
        keep: tokens kept per image (int >= 1) or fraction kept (float in (0, 1]).
        objective: ``"max_sum"`` (v2) or ``"k_center"`` (v1).
        pivot: ``"cls"`` (highest [CLS] / mean-query attention; the base crop of an any-resolution
            image), ``"center"`` (nearest the mean embedding by cosine) or ``"farthest"`` (farthest from it).
    """

    keep: int | float = 0.1
    objective: str = "max_sum"
    pivot: str = "cls"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_choice(self.objective, "objective", OBJECTIVES)
        _check_choice(self.pivot, "pivot", PIVOTS)

    @property
    def requires(self) -> frozenset[str]:  # the vision probe runs only for the [CLS] pivot
        return frozenset({"cls_attention"}) if self.pivot == "cls" else frozenset()

    def pivot_index(self, image: ImageTokens) -> int:
        """Index of the first kept token of ``image``."""
        if self.pivot == "cls":
            attention = image.require("cls_attention", "ToDRE(pivot='cls')").float()
            blocks = image.spatial_blocks()
            if blocks is not None and len(blocks) > 1:  # any-resolution: the global thumbnail comes first
                attention = attention[: blocks[0][1] * blocks[0][2]]
            return int(attention.argmax())
        x = torch.nn.functional.normalize(image.features.float(), dim=-1)
        closeness = x @ torch.nn.functional.normalize(x.mean(0), dim=0)
        return int(closeness.argmax() if self.pivot == "center" else closeness.argmin())

    def select(self, image: ImageTokens) -> torch.Tensor:
        return self.select_batch([image])[0]

    def select_batch(self, images: Sequence[ImageTokens]) -> list[torch.Tensor]:
        ks = [self.num_kept(image.num_tokens) for image in images]
        pivots = [self.pivot_index(image) if image.num_tokens else 0 for image in images]
        return diverse_select([image.features for image in images], ks, pivots, self.objective)


@dataclass(frozen=True)
class ToDRERelevance(SequencePruner):
    """ToDRE's stage 2 (inside the decoder): before layer ``layer`` drop every visual token of the rows
    whose text->image and image->text attention ratios at layer ``layer - 1`` are both below
    ``threshold``; other rows keep them all. Applied by :class:`ToDRE`.

    Args:
        layer: first decoder layer without the dropped visual tokens (``1 <= layer < L``); ``None``:
            ``floor(7L/8) + 1``, capped at ``L - 1``.
        threshold: tau in [0, 1]; 0 never drops.
        impl: ``attention_topk`` implementation, ``"auto"`` | ``"triton"`` | ``"torch"``.
    """

    stage: ClassVar[str] = "llm"

    layer: Optional[int] = None
    threshold: float = 0.1
    impl: str = "auto"

    def __post_init__(self) -> None:
        _check_layer(self.layer)
        _check_threshold(self.threshold)
        _check_choice(self.impl, "impl", IMPLS)

    def resolve_schedule(self, depth: int) -> tuple[tuple[int, float | int], ...]:
        if depth < 2:
            raise ValueError(f"ToDRE's relevance stage needs a decoder with >= 2 layers, got {depth}")
        layer = min(depth * 7 // 8 + 1, depth - 1) if self.layer is None else self.layer
        if not 1 <= layer < depth:
            raise ValueError(f"layer must be in [1, {depth - 1}] for this model ({depth} decoder layers), got {layer}")
        return ((layer, 1.0),)

    @property
    def query_rows(self) -> Optional[int]:
        return None  # text and image queries

    @staticmethod
    def partition(view: DecoderView) -> tuple[torch.Tensor, torch.Tensor]:
        """``(image, text)`` ``[B, n]`` masks: the row's image slots (V) and its text slots after the
        first image (T); what precedes the first image is the system prompt (S)."""
        image = view.valid & (view.groups >= 0)
        never = torch.iinfo(view.index.dtype).max
        first = torch.where(image, view.index, never).min(dim=1, keepdim=True).values
        return image, view.valid & ~image & (view.index > first)

    def score(self, view: DecoderView) -> torch.Tensor:
        """``[B, n]`` attention of the text tokens T onto each slot (mean over heads and T)."""
        _, text = self.partition(view)
        return view.attention_from(text, impl=self.impl)

    def budget(self, view: DecoderView, scores: torch.Tensor, keep: int | float, sizes: torch.Tensor) -> torch.Tensor:
        image, text = self.partition(view)
        text_to_image = (scores * image).sum(dim=1)
        drop = text.any(dim=1) & (text_to_image < self.threshold)
        if bool(drop.any()):  # image->text only matters where text->image is already low
            image_to_text = (view.attention_from(image & drop[:, None], impl=self.impl) * text).sum(dim=1)
            drop &= image_to_text < self.threshold
        return torch.where(drop.to(sizes.device)[:, None], torch.zeros_like(sizes), sizes)


@register("todre")
@dataclass(frozen=True)
class ToDRE(Pruner):
    """Args:
        keep: stage 1, visual tokens kept per image: a count (>= 1) or a fraction in (0, 1]
            (paper: 0.1; 0.25 in its second setting).
        objective: stage 1 greedy objective, ``"max_sum"`` (v2, default) or ``"k_center"`` (v1).
        pivot: stage 1 first token, ``"cls"`` (paper), ``"center"`` or ``"farthest"``.
        layer: stage 2, first decoder layer without the row's visual tokens when they are dropped;
            ``None`` = ``floor(7L/8) + 1`` (the ratios at 7L/8), capped at ``L - 1``.
        threshold: stage 2 tau in [0, 1]: a row drops its visual tokens when both attention ratios
            are below it (paper: 0.10; 0 disables stage 2).
        impl: attention implementation of stage 2, ``"auto"`` | ``"triton"`` | ``"torch"``.
    """

    stage: ClassVar[str] = "composite"

    keep: int | float = 0.1
    objective: str = "max_sum"
    pivot: str = "cls"
    layer: Optional[int] = None
    threshold: float = 0.1
    impl: str = "auto"

    def __post_init__(self) -> None:
        self.components()  # each stage validates its own fields

    def components(self) -> tuple[Pruner, ...]:
        return (ToDREDiversity(keep=self.keep, objective=self.objective, pivot=self.pivot),
                ToDRERelevance(layer=self.layer, threshold=self.threshold, impl=self.impl))
