"""LLaVA-1.5 (``LlavaForConditionalGeneration``) in vLLM with pre-LLM visual token pruning.

The count/selection split is :mod:`tokenprune.integrations.vllm.common`'s: each image gets
``K = method.num_kept(N)`` placeholders, where ``N`` is LLaVA's count (576 for 336 px CLIP-L/14), and
:meth:`TokenpruneLlavaForConditionalGeneration.embed_multimodal` keeps ``K`` of the ``N``
post-projector rows by content, in original order; DivPrune runs one packed ``mmdp_select`` over all
images of the batch.

Positions are re-indexed: the language model sees a shorter, contiguous prompt (LLaVA has 1-D
RoPE, so no runner change is needed), as in DivPrune's and VisionZip's public code.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any, Iterator, Optional

import torch
from transformers import BatchFeature, LlavaConfig, PixtralVisionConfig
from vllm.model_executor.models.clip import CLIPVisionModel
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalKwargsItems
from vllm.multimodal.parse import MultiModalDataItems
from vllm.multimodal.processing import InputProcessingContext, PromptReplacement, PromptUpdate

from tokenprune.integrations.hf.probes import CLS, FLOW, KEYS, cls_query_record, select_records
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
from tokenprune.integrations.vllm.config import ENV_VAR
from tokenprune.methods.base import ImageTokens
from tokenprune.stats import PruneStats

__all__ = [
    "NUM_KEPT_FIELD",
    "TokenpruneLlavaProcessingInfo",
    "TokenpruneLlavaMultiModalProcessor",
    "TokenpruneLlavaForConditionalGeneration",
    "ClipVisionProbe",
]

#: inputs the LLaVA models compute for methods that ``require`` them ([CLS] statistics: CLIP only).
LLAVA_PROVIDES = frozenset({"grid", CLS, KEYS, FLOW})


def _check_vision_tower(hf_config: Any) -> None:
    if isinstance(hf_config.vision_config, PixtralVisionConfig):
        raise NotImplementedError(
            "tokenprune's vLLM plugin supports LLaVA-1.5 checkpoints with a CLIP or SigLIP vision "
            "tower; this LlavaForConditionalGeneration checkpoint uses a Pixtral tower (its image "
            f"token runs contain [IMG_BREAK] tokens). Unset {ENV_VAR} to serve it unpruned."
        )


# --------------------------------------------------------------------------- front end


class TokenpruneLlavaProcessingInfo(PruningProcessingInfo, LlavaProcessingInfo):
    """LLaVA processing info that knows the configured method and resolves per-request budgets."""

    tokenprune_architecture = "LlavaForConditionalGeneration"
    tokenprune_provides = LLAVA_PROVIDES

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        # Without this vLLM measures the maximum on a dummy image processed with the *configured*
        # budget and then rejects requests whose per-request budget is larger.
        return {"image": self.get_max_image_tokens()}


class TokenpruneLlavaMultiModalProcessor(PruningProcessor, LlavaMultiModalProcessor):
    """Asks for exactly ``K`` placeholders per image and hands ``K`` to the model."""

    info: TokenpruneLlavaProcessingInfo

    def tokenprune_counts(self, processed: BatchFeature, mm_kwargs: Mapping[str, object]) -> Optional[list[int]]:
        pixel_values = processed.get("pixel_values")
        if pixel_values is None:
            return None
        return [
            self.info.tokenprune_kept(
                self.info.get_num_image_tokens(image_width=int(p.shape[-1]), image_height=int(p.shape[-2])), mm_kwargs
            )
            for p in pixel_values
        ]

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
            return unpruned.replacement(item_idx) if k is None else [image_token_id] * k

        return [PromptReplacement(modality="image", target=[image_token_id], replacement=replacement)]


def _build_info(ctx: InputProcessingContext) -> TokenpruneLlavaProcessingInfo:
    _check_vision_tower(ctx.get_hf_config(LlavaConfig))
    info = TokenpruneLlavaProcessingInfo(ctx)
    info.tokenprune_method()  # a bad hf_overrides value fails here, at engine start
    return info


def _build_processor(info: TokenpruneLlavaProcessingInfo, dummy_inputs: Any, **kwargs: Any):
    return TokenpruneLlavaMultiModalProcessor(info, dummy_inputs, **kwargs)


# --------------------------------------------------------------------------- worker


class ClipVisionProbe:
    """[CLS]-query statistics of vLLM's CLIP tower, for methods that need them (HoloV, VisionZip:
    ``cls_attention``/``keys``; FlowCut: ``flow_layers``).

    The same records as the Hugging Face integration's ``ClipProbe`` (shared math:
    :func:`~tokenprune.integrations.hf.probes.cls_query_record`): per layer, the softmax attention
    of the [CLS] query onto every token (mean over heads), with FlowCut the [CLS] value similarity
    and the value norm, and at the feature layer the head-averaged keys. vLLM's CLIP attention is
    fused (``MMEncoderAttention``) and returns no weights, so forward hooks on the wanted layers'
    ``qkv_proj`` recompute them from the layer's own projections. vLLM builds the tower only up to
    the ``vision_feature_layer`` (-2 for LLaVA-1.5), so its last loaded layer is the feature layer,
    which is where HoloV and VisionZip read [CLS] attention. With tensor parallelism each rank
    holds some heads; head sums are all-reduced so every rank selects the same rows.

    Records are ``[B, 1 + N]`` per tower call (``[B, 1 + N, d]`` keys), [CLS] first; ``first`` is
    the index of the first patch the projector keeps (1 for the ``default`` strategy).
    """

    def __init__(self, vision_tower: Any, feature_select_strategy: str, requires: frozenset[str]):
        if not isinstance(vision_tower, CLIPVisionModel):
            raise ValueError(
                f"tokenprune: {', '.join(sorted(requires & {CLS, KEYS, FLOW}))} need a CLIP vision tower with a "
                f"[CLS] token, got {type(vision_tower).__name__}; use a method without them (e.g. divprune)"
            )
        if feature_select_strategy not in ("default", "full"):
            raise ValueError(
                f"tokenprune: [CLS] statistics support vision_feature_select_strategy 'default' or "
                f"'full', got {feature_select_strategy!r}"
            )
        self.requires = frozenset(requires) & {CLS, KEYS, FLOW}
        self.first = 1 if feature_select_strategy == "default" else 0
        layers = vision_tower.vision_model.encoder.layers
        self.feature_layer = len(layers) - 1
        self._records: Optional[dict[int, dict[str, torch.Tensor]]] = None
        for index, layer in enumerate(layers):
            if FLOW in self.requires or index == self.feature_layer:
                layer.self_attn.qkv_proj.register_forward_hook(self._hook(index, layer.self_attn))

    def _hook(self, index: int, attn: Any):
        def head_sum(x: torch.Tensor) -> torch.Tensor:
            from vllm.distributed import tensor_model_parallel_all_reduce

            return tensor_model_parallel_all_reduce(x.contiguous())

        def hook(module: torch.nn.Module, inputs: Any, output: Any) -> None:
            if self._records is None:
                return
            qkv = output[0] if isinstance(output, tuple) else output  # [B, T, 3 * H_local * d]
            shape = (*qkv.shape[:2], attn.num_heads_per_partition, attn.head_dim)
            q, k, v = (x.reshape(shape) for x in qkv.chunk(3, dim=-1))
            self._records[index] = cls_query_record(
                q, k, v, attn.scale, self.requires, keys=index == self.feature_layer,
                head_sum=head_sum if attn.tp_size > 1 else None, num_heads=attn.num_heads,
            )

        return hook

    @contextlib.contextmanager
    def capture(self) -> Iterator[dict[int, dict[str, torch.Tensor]]]:
        """Collect the records of the one tower call inside the block."""
        self._records = {}
        try:
            yield self._records
        finally:
            self._records = None


def _square_grid(n: int) -> Optional[tuple[int, int]]:
    side = int(round(n**0.5))
    return (side, side) if side * side == n else None


@MULTIMODAL_REGISTRY.register_processor(_build_processor, info=_build_info, dummy_inputs=LlavaDummyInputsBuilder)
class TokenpruneLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    """vLLM's LLaVA whose image embedding step keeps ``K`` rows per image, chosen by the method.

    Registered under ``LlavaForConditionalGeneration`` when ``TOKENPRUNE_CONFIG`` is set, and
    always under its own name (select it with ``hf_overrides={"architectures": [...]}``).
    """

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        _check_vision_tower(self.config)
        self.tokenprune_method = configured_method(self.config, "LlavaForConditionalGeneration", LLAVA_PROVIDES, vllm_config)
        #: before/after counts per image (inspect with ``LLM.apply_model``).
        self.tokenprune_stats = PruneStats()
        self._vision_probe: Optional[ClipVisionProbe] = None
        if self.tokenprune_method.requires & {CLS, KEYS, FLOW}:
            self._vision_probe = ClipVisionProbe(
                self.vision_tower, self.config.vision_feature_select_strategy, self.tokenprune_method.requires
            )

    def embed_multimodal(self, **kwargs: object):
        num_kept = kwargs.pop(NUM_KEPT_FIELD, None)
        image_input = self._parse_and_validate_image_input(**kwargs)
        if image_input is None:
            return []
        if image_input["type"] == "image_embeds" or num_kept is None:
            return self._process_image_input(image_input)
        probe = self._vision_probe
        with probe.capture() if probe else contextlib.nullcontext({}) as records:
            embeds = self._process_image_input(image_input)
        features = list(embeds.unbind(0)) if isinstance(embeds, torch.Tensor) else list(embeds)
        images = []
        for i, f in enumerate(features):
            cls_attention, extras = select_records(
                records, probe.feature_layer if probe else 0, self.tokenprune_method.requires,
                lambda t, i=i, dev=f.device: t[i, probe.first:].to(dev),
            )
            images.append(ImageTokens(features=f, grid=_square_grid(f.shape[0]), cls_attention=cls_attention,
                                      extras=extras or None))
        return self.prune_image_embeddings(images, kept_counts(num_kept, len(images)))

    def prune_image_embeddings(self, images: Sequence[ImageTokens], counts: Sequence[int]) -> list[torch.Tensor]:
        """Keep ``counts[i]`` rows of image ``i`` (original order); see
        :func:`~tokenprune.integrations.vllm.common.select_rows`."""
        chosen = select_rows(self.tokenprune_method, images, counts)
        record_stats(self.tokenprune_stats, images, chosen)
        return [rows for _, rows in chosen]
