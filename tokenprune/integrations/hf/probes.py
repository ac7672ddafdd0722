"""Vision-encoder probes: the per-layer statistics that attention-guided visual methods read.

Pre-LLM methods need what the vision encoder's attention saw: HoloV and VisionZip the [CLS]
attention at the feature layer, VisionZip that layer's keys, FlowCut every layer's attention row,
value similarity and value norm. The probes compute these from each attention layer's own
projections, captured with forward hooks while the encoder runs normally (SDPA/flash stay on; the
encoder is never switched to eager attention). Only one query row per image is formed, so the cost
is ``O(N)`` per layer, never the ``N x N`` attention matrix.

Hooks live only for one ``with probe:`` block.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Optional

import torch

#: statistic names a method may ``require`` and the probes provide.
FLOW = "flow_layers"
KEYS = "keys"
CLS = "cls_attention"


class _Probe:
    """Registers hooks on a list of attention modules and keeps one record per layer."""

    def __init__(self, layers: list[torch.nn.Module], feature_layer: int, requires: frozenset[str]):
        self.layers = layers
        self.feature_layer = feature_layer
        self.requires = requires
        self.records: dict[int, dict[str, torch.Tensor]] = {}
        self._handles: list[Any] = []
        self._captured: dict[int, dict[str, Any]] = {}

    @property
    def active(self) -> bool:
        return bool(self.requires & {FLOW, KEYS, CLS})

    def wanted(self, index: int) -> bool:
        if index > self.feature_layer:
            return False
        return FLOW in self.requires or index == self.feature_layer

    def __enter__(self) -> "_Probe":
        if self.active:
            for index, attention in enumerate(self.layers):
                if self.wanted(index):
                    self._register(index, attention)
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._captured.clear()

    def _store(self, index: int, name: str):
        def hook(module: Any, args: tuple, output: torch.Tensor) -> None:
            self._captured.setdefault(index, {})[name] = output.detach()

        return hook

    def _register(self, index: int, attention: torch.nn.Module) -> None:
        raise NotImplementedError


class ClipProbe(_Probe):
    """CLIP-style encoders (LLaVA-1.5, LLaVA-NeXT): the [CLS] token (position 0) is the query.

    Records per layer, for every crop ``[num_crops, N + 1]``: ``attention`` (CLS attention, mean over
    heads), ``value_similarity`` (softmax of the CLS value against every value, mean over heads, as
    FlowCut), ``value_norm`` (L1 norm of the head-averaged value); at the feature layer ``keys``
    ``[num_crops, N + 1, head_dim]`` (keys averaged over heads, as VisionZip).
    """

    def _register(self, index: int, attention: torch.nn.Module) -> None:
        self._handles.append(attention.q_proj.register_forward_hook(self._store(index, "q")))
        self._handles.append(attention.k_proj.register_forward_hook(self._store(index, "k")))
        self._handles.append(attention.v_proj.register_forward_hook(self._store(index, "v")))
        self._handles.append(attention.register_forward_hook(self._finish(index, attention)))

    def _finish(self, index: int, attention: torch.nn.Module):
        def hook(module: Any, args: tuple, output: Any) -> None:
            cap = self._captured.pop(index)
            heads, dim = attention.num_heads, attention.head_dim
            b, n = cap["k"].shape[:2]
            shape = (b, n, heads, dim)
            self.records[index] = cls_query_record(
                cap["q"].view(shape), cap["k"].view(shape), cap["v"].view(shape), attention.scale, self.requires,
                keys=index == self.feature_layer,
            )

        return hook


def cls_query_record(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    requires: frozenset[str],
    keys: bool = False,
    head_sum: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    num_heads: Optional[int] = None,
) -> dict[str, torch.Tensor]:
    """One layer's :class:`ClipProbe` record from its queries, keys and values.

    Args:
        q, k, v: ``[B, N + 1, H, d]`` per crop, [CLS] at position 0.
        keys: add ``keys`` (the feature layer, when ``KEYS`` is required).
        head_sum: completes a sum over ``H`` heads across tensor-parallel ranks (vLLM shards heads);
            ``None`` when ``H`` are all the heads.
        num_heads: the total number of heads (``H`` by default).

    Returns ``attention`` ``[B, N + 1]`` ([CLS] attention, softmax per head, mean over heads), with
    ``FLOW`` ``value_similarity`` ``[B, N + 1]`` (softmax of the [CLS] value against every value,
    mean over heads) and ``value_norm`` (L1 norm of the head-averaged value), with ``keys`` and
    ``KEYS`` ``keys`` ``[B, N + 1, d]`` (head-averaged keys).
    """
    reduce = head_sum or (lambda x: x)
    total = num_heads or q.shape[2]

    def head_mean(x: torch.Tensor, dim: int) -> torch.Tensor:
        return reduce(x.sum(dim=dim)) / total

    q, k, v = q[:, 0].float(), k.float(), v.float()
    record = {"attention": head_mean(torch.softmax(torch.einsum("bhd,bnhd->bhn", q, k) * scale, dim=-1), 1)}
    if FLOW in requires:
        record["value_similarity"] = head_mean(torch.softmax(torch.einsum("bhd,bnhd->bhn", v[:, 0], v), dim=-1), 1)
        record["value_norm"] = head_mean(v, 2).abs().sum(dim=-1)
    if KEYS in requires and keys:
        record["keys"] = head_mean(k, 2)
    return record


class MeanQueryProbe(_Probe):
    """Encoders without [CLS] on packed sequences (Qwen2-VL / Qwen2.5-VL vision towers).

    The query is the mean of an image's (RoPE-applied) patch queries, attending over that image's
    patches (FlowCut's "global query" for Qwen). ``segments`` are the images' ``[start, end)`` in the
    packed sequence (window reordering keeps each image contiguous). Records are packed ``[S]``
    (``attention``, ``value_norm``) and ``[S, head_dim]`` (``keys``, before RoPE); there is no
    ``value_similarity`` (no [CLS] value), as in the public FlowCut-Qwen code.
    """

    def __init__(self, layers, feature_layer, requires, segments: list[tuple[int, int]]):
        super().__init__(layers, feature_layer, requires)
        self.segments = segments

    def _register(self, index: int, attention: torch.nn.Module) -> None:
        self._handles.append(attention.qkv.register_forward_hook(self._store(index, "qkv")))
        self._handles.append(
            attention.register_forward_pre_hook(self._positions(index), with_kwargs=True)
        )
        self._handles.append(attention.register_forward_hook(self._finish(index, attention)))

    def _positions(self, index: int):
        def hook(module: Any, args: tuple, kwargs: dict) -> None:
            self._captured.setdefault(index, {})["rope"] = kwargs.get("position_embeddings")

        return hook

    def _finish(self, index: int, attention: torch.nn.Module):
        rotary = getattr(sys.modules[type(attention).__module__], "apply_rotary_pos_emb_vision")

        def hook(module: Any, args: tuple, output: Any) -> None:
            cap = self._captured.pop(index)
            qkv = cap["qkv"]
            s = qkv.shape[0]
            q, k, v = qkv.reshape(s, 3, attention.num_heads, -1).permute(1, 0, 2, 3).unbind(0)  # [S, H, d] each
            raw_k = k
            if cap.get("rope") is not None:
                cos, sin = cap["rope"]
                q, k = rotary(q, k, cos, sin)
            self.records[index] = mean_query_record(
                q, k, v, self.segments, attention.scaling, self.requires,
                raw_k=raw_k if index == self.feature_layer else None,
            )

        return hook


def mean_query_record(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segments: list[tuple[int, int]],
    scale: float,
    requires: frozenset[str],
    raw_k: Optional[torch.Tensor] = None,
    head_sum: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    num_heads: Optional[int] = None,
) -> dict[str, torch.Tensor]:
    """One layer's :class:`MeanQueryProbe` record from its queries, keys and values.

    Args:
        q, k, v: ``[S, H, d]`` packed over the images (``q``/``k`` with RoPE applied).
        segments: each image's ``[start, end)`` in the packed sequence.
        raw_k: ``[S, H, d]`` keys before RoPE; given at the feature layer, it adds ``keys``.
        head_sum: completes a sum over ``H`` heads across tensor-parallel ranks (vLLM shards heads);
            ``None`` when ``H`` are all the heads.
        num_heads: the total number of heads (``H`` by default).

    Returns ``attention`` ``[S]`` (mean query of each image onto its patches, softmax per head,
    mean over heads), with ``FLOW`` ``value_norm`` ``[S]`` (L1 norm of the head-averaged value), with
    ``raw_k`` and ``KEYS`` ``keys`` ``[S, d]`` (head-averaged keys before RoPE).
    """
    reduce = head_sum or (lambda x: x)
    total = num_heads or q.shape[1]
    q, k = q.float(), k.float()
    attention = torch.empty(q.shape[0], device=q.device)
    for start, end in segments:
        mean_q = q[start:end].mean(dim=0)  # [H, d]
        logits = torch.einsum("hd,nhd->hn", mean_q, k[start:end]) * scale
        attention[start:end] = torch.softmax(logits, dim=-1).sum(dim=0)
    record = {"attention": reduce(attention) / total}
    if FLOW in requires:
        record["value_norm"] = (reduce(v.float().sum(dim=1)) / total).abs().sum(dim=-1)
    if KEYS in requires and raw_k is not None:
        record["keys"] = reduce(raw_k.float().sum(dim=1)) / total
    return record


def feature_layer_index(vision_feature_layer: Any, num_layers: int) -> int:
    """Index of the encoder layer whose output is ``hidden_states[vision_feature_layer]``
    (``hidden_states[0]`` is the embedding output); the last one for a list of feature layers."""
    layers = vision_feature_layer if isinstance(vision_feature_layer, (list, tuple)) else [vision_feature_layer]
    indices = [(f if f >= 0 else num_layers + 1 + f) - 1 for f in layers]
    index = max(indices)
    if index < 0:
        raise NotImplementedError("attention-guided methods need a feature layer after the first encoder layer")
    return index


def select_records(records: dict[int, dict[str, torch.Tensor]], feature_layer: int, requires: frozenset[str],
                   pick) -> tuple[Optional[torch.Tensor], dict[str, Any]]:
    """Turn raw probe records into ``(cls_attention, extras)`` for one image.

    ``pick(tensor)`` maps a record tensor (crop- or packed-indexed) to the image's token order.
    """
    if not records:
        return None, {}
    feature = records[feature_layer]
    cls_attention = pick(feature["attention"]) if CLS in requires or KEYS in requires else None
    extras: dict[str, Any] = {}
    if KEYS in requires:
        extras[KEYS] = pick(feature[KEYS])
    if FLOW in requires:
        extras[FLOW] = [
            {name: pick(value) for name, value in records[i].items() if name != KEYS}
            for i in sorted(records)
        ]
    return cls_attention, extras
