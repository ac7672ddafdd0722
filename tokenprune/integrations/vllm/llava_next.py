"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``) in vLLM with pre-LLM visual token pruning.

An any-resolution image is its base crop followed by the unpadded high-resolution grid, each grid
row closed by a learned ``image_newline`` token. vLLM sizes the placeholder run before the image is
encoded, so the count must not depend on content. The rule (**every newline is kept**):

* the method sees the image's *content* tokens, base crop + grid without newlines (``N``), with
  ``blocks = [(0, side, side), (side^2, rows, cols)]`` and per-crop [CLS] attention, exactly as
  the Hugging Face integration's ``LlavaNextAdapter`` builds them, and keeps ``K = num_kept(N)``;
* every one of the ``R`` newline tokens stays, so an image takes ``K + R`` placeholders (``R`` is
  the number of grid rows, a function of the image size only). Kept tokens stay in packed order
  between their row's newlines, so the decoder still sees which row every kept token sits on.

The Hugging Face integration instead drops the newline of a row that lost all its tokens, a count
that depends on which tokens were kept; vLLM cannot size that in advance. The selection is the
same; only the newline slots differ.

The packed order (which slot holds which crop token, and where the newlines are) comes from vLLM's
own ``_merge_image_patch_embeddings`` run on an index tensor, so the unpadding always matches the
model's. Positions are re-indexed as for LLaVA-1.5 (1-D RoPE).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from types import SimpleNamespace
from typing import Any, Optional

import torch
from transformers import BatchFeature, LlavaNextConfig
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape
from vllm.model_executor.models.llava import LlavaDummyInputsBuilder
from vllm.model_executor.models.llava_next import (
    LlavaNextForConditionalGeneration,
    LlavaNextMultiModalProcessor,
    LlavaNextProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalKwargsItems
from vllm.multimodal.parse import MultiModalDataItems
from vllm.multimodal.processing import InputProcessingContext, PromptReplacement, PromptUpdate

from tokenprune.integrations.hf.probes import CLS, FLOW, KEYS, select_records
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
from tokenprune.integrations.vllm.llava import LLAVA_PROVIDES, ClipVisionProbe
from tokenprune.methods.base import ImageTokens
from tokenprune.stats import PruneStats

__all__ = [
    "TokenpruneLlavaNextProcessingInfo",
    "TokenpruneLlavaNextMultiModalProcessor",
    "TokenpruneLlavaNextForConditionalGeneration",
]

_ARCH = "LlavaNextForConditionalGeneration"


class TokenpruneLlavaNextProcessingInfo(PruningProcessingInfo, LlavaNextProcessingInfo):
    tokenprune_architecture = _ARCH
    tokenprune_provides = LLAVA_PROVIDES

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        # A request may ask for any budget: size the encoder cache for the unpruned maximum.
        return {"image": self.get_max_image_tokens()}

    def tokenprune_split(self, *, image_width: int, image_height: int) -> tuple[int, int]:
        """``(content, newlines)`` placeholders of an unpruned image, from vLLM's own count formula."""
        hf_config = self.get_hf_config()
        encoder = self.get_vision_encoder_info()
        rows, cols = get_anyres_image_grid_shape(
            image_size=(image_height, image_width),
            grid_pinpoints=hf_config.image_grid_pinpoints,
            patch_size=encoder.get_image_size(),
        )
        _, newlines = self._get_num_unpadded_features(
            original_height=image_height,
            original_width=image_width,
            npatches=encoder.get_patch_grid_length(),
            num_patch_height=rows,
            num_patch_width=cols,
        )
        total = self.get_num_image_tokens(image_width=image_width, image_height=image_height)
        return total - newlines, newlines


class TokenpruneLlavaNextMultiModalProcessor(PruningProcessor, LlavaNextMultiModalProcessor):
    """``K + R`` placeholders per image: ``K`` kept content tokens and every newline."""

    info: TokenpruneLlavaNextProcessingInfo

    def tokenprune_counts(self, processed: BatchFeature, mm_kwargs: Mapping[str, object]) -> Optional[list[int]]:
        if processed.get("pixel_values") is None or processed.get("image_sizes") is None:
            return None
        counts = []
        for height, width in torch.as_tensor(processed["image_sizes"]).tolist():
            content, _ = self.info.tokenprune_split(image_width=int(width), image_height=int(height))
            counts.append(self.info.tokenprune_kept(content, mm_kwargs))
        return counts

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        image_token_id = self.info.get_hf_config().image_token_index
        (unpruned,) = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)

        def replacement(item_idx: int):
            k = kept_field(out_mm_kwargs, item_idx)
            if k is None:
                return unpruned.replacement(item_idx)
            height, width = out_mm_kwargs["image"][item_idx]["image_sizes"].data.tolist()
            _, newlines = self.info.tokenprune_split(image_width=int(width), image_height=int(height))
            return [image_token_id] * (k + newlines)

        return [PromptReplacement(modality="image", target=[image_token_id], replacement=replacement)]


def _build_info(ctx: InputProcessingContext) -> TokenpruneLlavaNextProcessingInfo:
    ctx.get_hf_config(LlavaNextConfig)
    info = TokenpruneLlavaNextProcessingInfo(ctx)
    info.tokenprune_method()  # a bad hf_overrides value fails here, at engine start
    return info


def _build_processor(info: TokenpruneLlavaNextProcessingInfo, dummy_inputs: Any, **kwargs: Any):
    return TokenpruneLlavaNextMultiModalProcessor(info, dummy_inputs, **kwargs)


@MULTIMODAL_REGISTRY.register_processor(_build_processor, info=_build_info, dummy_inputs=LlavaDummyInputsBuilder)
class TokenpruneLlavaNextForConditionalGeneration(LlavaNextForConditionalGeneration):
    """vLLM's LLaVA-NeXT whose images keep ``K`` content tokens each plus every row newline."""

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.tokenprune_method = configured_method(self.config, _ARCH, LLAVA_PROVIDES, vllm_config)
        #: before/after placeholder counts per image of the last encoder call (``LLM.apply_model``).
        self.tokenprune_stats = PruneStats()
        self._vision_probe: Optional[ClipVisionProbe] = None
        if self.tokenprune_method.requires & {CLS, KEYS, FLOW}:
            self._vision_probe = ClipVisionProbe(
                self.vision_tower, self.config.vision_feature_select_strategy, self.tokenprune_method.requires
            )

    def tokenprune_layout(self, image_size: torch.Tensor, num_crops: int, tokens_per_crop: int) -> torch.Tensor:
        """Packed order of one image: ``[L]`` with ``crop * T + token`` per content slot, ``-1`` per
        newline, from vLLM's own ``_merge_image_patch_embeddings`` run on an index tensor."""
        index = torch.arange(num_crops * tokens_per_crop, dtype=torch.float64).view(num_crops, tokens_per_crop, 1)
        stand_in = SimpleNamespace(config=self.config, image_newline=torch.tensor([-1.0], dtype=torch.float64))
        packed = LlavaNextForConditionalGeneration._merge_image_patch_embeddings(
            stand_in, image_size, index, strategy="spatial_unpad"
        )
        return packed[:, 0].round().long()

    def embed_multimodal(self, **kwargs: object):
        num_kept = kwargs.pop(NUM_KEPT_FIELD, None)
        image_input = self._parse_and_validate_image_input(**kwargs)
        if image_input is None:
            return []
        if image_input["type"] != "pixel_values" or num_kept is None:
            return self._process_image_input(image_input)
        images, layouts = self.tokenprune_images(image_input)
        chosen = select_rows(self.tokenprune_method, images, kept_counts(num_kept, len(images)))
        out = []
        for (kept, rows), (packed, content, newlines) in zip(chosen, layouts):
            if kept is None:
                out.append(packed)
                continue
            slots = torch.cat([content[kept], newlines])
            values = torch.cat([rows, packed[newlines]])
            out.append(values[torch.argsort(slots)])
        record_stats(self.tokenprune_stats, images, chosen, before=[p.shape[0] for p, _, _ in layouts],
                     after=[o.shape[0] for o in out])
        return out

    def tokenprune_images(self, image_input: Mapping[str, Any]):
        """Encode pixel images: the method's view of each (its content tokens, as the Hugging Face
        integration's ``LlavaNextAdapter.encode_images``) and its packed layout ``(packed [L, D],
        content slots, newline slots)``."""
        probe = self._vision_probe
        with probe.capture() if probe else contextlib.nullcontext({}) as records:
            crops = list(self._process_image_pixels(image_input))  # [crops_i, T, D] per image
        sizes = image_input["image_sizes"]
        images, layouts, crop_offset = [], [], 0
        for i, patches in enumerate(crops):
            n_crops, per_crop = patches.shape[0], patches.shape[1]
            packed = self._merge_image_patch_embeddings(sizes[i], patches, strategy="spatial_unpad")
            order = self.tokenprune_layout(sizes[i], n_crops, per_crop).to(packed.device)
            if order.numel() != packed.shape[0]:
                raise RuntimeError(f"tokenprune: layout of image {i} has {order.numel()} slots, packed {packed.shape[0]}")
            content = torch.nonzero(order >= 0).flatten()
            newlines = torch.nonzero(order < 0).flatten()
            side = int(round(per_crop**0.5))
            blocks = None
            if side * side == per_crop:
                blocks = [(0, side, side)]
                rest, rows = content.numel() - per_crop, newlines.numel()
                if n_crops > 1 and rows and rest % rows == 0:
                    blocks.append((per_crop, rows, rest // rows))
            source = order[content]  # crop * T + token of each content token

            def pick(t: torch.Tensor, lo=crop_offset, n=n_crops, src=source, dev=packed.device) -> torch.Tensor:
                # A record of every crop [crops, 1 + T, ...] -> the image's content tokens.
                flat = t[lo : lo + n, probe.first :]
                return flat.reshape(n * flat.shape[1], *flat.shape[2:])[src.to(flat.device)].to(dev)

            cls_attention, extras = select_records(
                records, probe.feature_layer if probe else 0, self.tokenprune_method.requires, pick
            )
            images.append(
                ImageTokens(features=packed[content], grid=(side, side) if n_crops == 1 and blocks else None,
                            cls_attention=cls_attention, extras=extras or None, blocks=blocks)
            )
            layouts.append((packed, content, newlines))
            crop_offset += n_crops
        return images, layouts
