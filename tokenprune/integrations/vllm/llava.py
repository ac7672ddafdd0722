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
    "ClsAttentionProbe",
]

#: inputs the LLaVA model computes for methods that ``require`` them ([CLS] attention: CLIP only).
LLAVA_PROVIDES = frozenset({"cls_attention", "grid"})


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


class ClsAttentionProbe:
    """Attention of the vision [CLS] token onto every patch, from the encoder's own q/k.

    vLLM's CLIP attention is fused (``MMEncoderAttention``) and returns no weights, so a forward
    hook on the last loaded encoder layer's ``qkv_proj`` recomputes one softmax row per head:
    ``softmax(q_cls . K^T * scale)``, averaged over heads. That layer is the one whose output LLaVA
    feeds to the projector (``vision_feature_layer``, -2 for LLaVA-1.5), which is where HoloV and
    VisionZip read [CLS] attention. With tensor parallelism each rank holds some heads; the head sum
    is all-reduced so every rank gets the same scores (and so the same selection).

    Shapes: ``qkv`` output ``[B, T, 3 * H_local * d]`` with ``T = 1 + N``; scores ``[B, N]`` over
    the patch tokens (``[B, T]`` when the feature strategy keeps [CLS], ``"full"``).
    """

    def __init__(self, vision_tower: Any, feature_select_strategy: str):
        if not isinstance(vision_tower, CLIPVisionModel):
            raise ValueError(
                f"tokenprune: cls_attention needs a CLIP vision tower with a [CLS] token, got "
                f"{type(vision_tower).__name__}; use a method without it (e.g. divprune)"
            )
        if feature_select_strategy not in ("default", "full"):
            raise ValueError(
                f"tokenprune: cls_attention supports vision_feature_select_strategy 'default' or "
                f"'full', got {feature_select_strategy!r}"
            )
        self.attention = vision_tower.vision_model.encoder.layers[-1].self_attn
        self.drop_cls = feature_select_strategy == "default"
        self._captured: Optional[list[torch.Tensor]] = None
        self.attention.qkv_proj.register_forward_hook(self._hook)

    def _hook(self, module: torch.nn.Module, inputs: Any, output: Any) -> None:
        if self._captured is None:
            return
        qkv = output[0] if isinstance(output, tuple) else output
        attn = self.attention
        q, k, _ = qkv.chunk(3, dim=-1)
        batch, length = q.shape[0], q.shape[1]
        heads, dim = attn.num_heads_per_partition, attn.head_dim
        q_cls = q[:, 0].reshape(batch, heads, dim).float()
        keys = k.reshape(batch, length, heads, dim).float()
        probs = torch.softmax(torch.einsum("bhd,bthd->bht", q_cls, keys) * attn.scale, dim=-1)
        total = probs.sum(dim=1)  # [B, T], summed over this rank's heads
        if attn.tp_size > 1:
            from vllm.distributed import tensor_model_parallel_all_reduce

            total = tensor_model_parallel_all_reduce(total)
        scores = total / attn.num_heads
        self._captured.append(scores[:, 1:] if self.drop_cls else scores)

    @contextlib.contextmanager
    def capture(self) -> Iterator[list[torch.Tensor]]:
        """Collect ``[B, N]`` scores for every tower call inside the block."""
        self._captured = []
        try:
            yield self._captured
        finally:
            self._captured = None


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
        self.tokenprune_method = configured_method(self.config, "LlavaForConditionalGeneration", LLAVA_PROVIDES)
        #: before/after counts per image (inspect with ``LLM.apply_model``).
        self.tokenprune_stats = PruneStats()
        self._cls_probe: Optional[ClsAttentionProbe] = None
        if "cls_attention" in self.tokenprune_method.requires:
            self._cls_probe = ClsAttentionProbe(self.vision_tower, self.config.vision_feature_select_strategy)

    def embed_multimodal(self, **kwargs: object):
        num_kept = kwargs.pop(NUM_KEPT_FIELD, None)
        image_input = self._parse_and_validate_image_input(**kwargs)
        if image_input is None:
            return []
        if image_input["type"] == "image_embeds" or num_kept is None:
            return self._process_image_input(image_input)
        with self._cls_probe.capture() if self._cls_probe else contextlib.nullcontext() as captured:
            embeds = self._process_image_input(image_input)
        features = list(embeds.unbind(0)) if isinstance(embeds, torch.Tensor) else list(embeds)
        cls_attention = torch.cat(captured, 0) if captured else None
        return self.prune_image_embeddings(features, kept_counts(num_kept, len(features)), cls_attention)

    def prune_image_embeddings(
        self,
        features: Sequence[torch.Tensor],
        counts: Sequence[int],
        cls_attention: Optional[torch.Tensor] = None,
    ) -> list[torch.Tensor]:
        """Keep ``counts[i]`` rows of image ``i``'s ``[N_i, D]`` embeddings (original order);
        see :func:`~tokenprune.integrations.vllm.common.select_rows`."""
        images = [
            ImageTokens(
                features=f,
                grid=_square_grid(f.shape[0]),
                cls_attention=cls_attention[i] if cls_attention is not None else None,
            )
            for i, f in enumerate(features)
        ]
        rows = [r for _, r in select_rows(self.tokenprune_method, images, counts)]
        record_stats(self.tokenprune_stats, [f.shape[0] for f in features], [r.shape[0] for r in rows])
        return rows
