"""LLaVA-1.5 (``LlavaForConditionalGeneration``) in vLLM with pre-LLM visual token pruning.

vLLM sizes each image's placeholder run in the front-end processor, before anything is
scheduled, and scatters the encoder's rows into those slots in the worker. Pruning therefore
splits in two, as vLLM's own EVS does for Qwen2.5-VL video:

* **count** (front end, :class:`TokenpruneLlavaMultiModalProcessor`): each image gets
  ``K = method.num_kept(N)`` placeholders, where ``N`` is LLaVA's count (576 for 336 px CLIP-L/14)
  and the method's ``keep`` can be overridden per request with
  ``mm_processor_kwargs={"tokenprune_keep": k}``. ``K`` travels to the worker as the per-image
  field ``tokenprune_num_kept``, and the placeholder run is sized from that same field, so the two
  sides cannot disagree;
* **which rows** (worker, :meth:`TokenpruneLlavaForConditionalGeneration.embed_multimodal`): the
  method selects (and possibly merges) ``K`` of the ``N`` post-projector rows by content, in
  original order; DivPrune runs one packed ``mmdp_select`` over all images of the batch.

Positions are re-indexed: the language model sees a shorter, contiguous prompt (LLaVA has 1-D
RoPE, so no runner change is needed), as in DivPrune's and VisionZip's public code.

vLLM silently truncates when the encoder returns more rows than placeholders (and raises on
fewer), so the model checks the row count of every image itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections import defaultdict
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
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import MultiModalDataItems
from vllm.multimodal.processing import InputProcessingContext, PromptReplacement, PromptUpdate

from tokenprune.integrations.vllm.config import (
    ENV_VAR,
    HF_CONFIG_KEY,
    REQUEST_KEEP_KEY,
    method_from_hf_config,
    request_keep,
)
from tokenprune.methods.base import ImageTokens, VisualPruner
from tokenprune.stats import PruneStats

__all__ = [
    "NUM_KEPT_FIELD",
    "TokenpruneLlavaProcessingInfo",
    "TokenpruneLlavaMultiModalProcessor",
    "TokenpruneLlavaForConditionalGeneration",
    "ClsAttentionProbe",
]

#: per-image field (int64 ``[num_images]``) carrying the kept-token count from processor to model.
NUM_KEPT_FIELD = "tokenprune_num_kept"


def configured_method(hf_config: Any) -> VisualPruner:
    method = method_from_hf_config(hf_config)
    if method is None:
        raise ValueError(
            "tokenprune: the pruned LLaVA architecture is selected but no method is configured; set "
            f"{ENV_VAR}='{{\"method\": \"divprune\", \"keep\": 64}}' or "
            f"hf_overrides={{{HF_CONFIG_KEY!r}: {{\"method\": \"divprune\", \"keep\": 64}}}}"
        )
    return method


def _check_vision_tower(hf_config: Any) -> None:
    if isinstance(hf_config.vision_config, PixtralVisionConfig):
        raise NotImplementedError(
            "tokenprune's vLLM plugin supports LLaVA-1.5 checkpoints with a CLIP or SigLIP vision "
            "tower; this LlavaForConditionalGeneration checkpoint uses a Pixtral tower (its image "
            f"token runs contain [IMG_BREAK] tokens). Unset {ENV_VAR} to serve it unpruned."
        )


# --------------------------------------------------------------------------- front end


class TokenpruneLlavaProcessingInfo(LlavaProcessingInfo):
    """LLaVA processing info that knows the configured method and resolves per-request budgets.

    ``get_num_image_tokens`` keeps returning the unpruned count ``N``, and so does the per-item
    maximum vLLM sizes its encoder cache and input validation with: a request may ask for any
    budget up to ``N``.
    """

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        # Without this vLLM measures the maximum on a dummy image processed with the *configured*
        # budget and then rejects requests whose per-request budget is larger.
        return {"image": self.get_max_image_tokens()}

    def tokenprune_method(self) -> VisualPruner:
        if not hasattr(self, "_tokenprune_method"):
            self._tokenprune_method = configured_method(self.get_hf_config())
        return self._tokenprune_method

    def get_num_kept_image_tokens(
        self, *, image_width: int, image_height: int, mm_kwargs: Mapping[str, object]
    ) -> int:
        """Placeholders for one image under the budget of the request's ``mm_kwargs``."""
        n = self.get_num_image_tokens(image_width=image_width, image_height=image_height)
        merged = self.ctx.get_merged_mm_kwargs(mm_kwargs)
        return request_keep(self.tokenprune_method(), merged).num_kept(n)


class TokenpruneLlavaMultiModalProcessor(LlavaMultiModalProcessor):
    """Asks for exactly ``K`` placeholders per image and hands ``K`` to the model."""

    info: TokenpruneLlavaProcessingInfo

    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> BatchFeature:
        # The per-request budget is ours; transformers would warn about it on every request.
        hf_kwargs = {k: v for k, v in hf_kwargs.items() if k != REQUEST_KEEP_KEY}
        return super()._call_hf_processor(hf_data, hf_kwargs)

    def _postprocess_hf_mm_data(
        self,
        mm_inputs: Mapping[str, object],
        hf_processor_mm_kwargs: Mapping[str, object],
        processed_data: BatchFeature,
    ) -> BatchFeature:
        processed = super()._postprocess_hf_mm_data(mm_inputs, hf_processor_mm_kwargs, processed_data)
        pixel_values = processed.get("pixel_values")
        if pixel_values is not None:
            counts = [
                self.info.get_num_kept_image_tokens(
                    image_width=int(p.shape[-1]), image_height=int(p.shape[-2]), mm_kwargs=hf_processor_mm_kwargs
                )
                for p in pixel_values
            ]
            processed[NUM_KEPT_FIELD] = torch.tensor(counts, dtype=torch.long)
        return processed

    def _get_mm_fields_config(
        self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]
    ) -> Mapping[str, MultiModalFieldConfig]:
        fields = dict(super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs))
        fields[NUM_KEPT_FIELD] = MultiModalFieldConfig.batched("image", keep_on_cpu=True)
        return fields

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        image_token_id = self.info.get_hf_config().image_token_index
        (unpruned,) = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)

        def replacement(item_idx: int):
            item = out_mm_kwargs.get("image", [None] * (item_idx + 1))[item_idx]
            if item is None or NUM_KEPT_FIELD not in item:
                # Precomputed image embeddings: the caller chose the rows; nothing is pruned.
                return unpruned.replacement(item_idx)
            return [image_token_id] * int(item[NUM_KEPT_FIELD].data)

        return [PromptReplacement(modality="image", target=[image_token_id], replacement=replacement)]


def _build_info(ctx: InputProcessingContext) -> TokenpruneLlavaProcessingInfo:
    hf_config = ctx.get_hf_config(LlavaConfig)
    _check_vision_tower(hf_config)
    configured_method(hf_config)  # a bad hf_overrides value fails here, at engine start
    return TokenpruneLlavaProcessingInfo(ctx)


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
        self.tokenprune_method = configured_method(self.config)
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
        counts = [int(c) for c in torch.as_tensor(num_kept).flatten().tolist()]
        if len(counts) != len(features):
            raise RuntimeError(
                f"tokenprune: {len(features)} image(s) were encoded but {len(counts)} kept-token "
                "counts arrived from the processor"
            )
        return self.prune_image_embeddings(features, counts, cls_attention)

    def prune_image_embeddings(
        self,
        features: Sequence[torch.Tensor],
        counts: Sequence[int],
        cls_attention: Optional[torch.Tensor] = None,
    ) -> list[torch.Tensor]:
        """Keep ``counts[i]`` rows of image ``i``'s ``[N_i, D]`` embeddings (original order).

        Images are grouped by budget and each group goes to ``select_batch`` at once (one packed
        ``mmdp_select`` launch for DivPrune). An image whose budget covers all its tokens is
        returned untouched, so keep-all reproduces the unpatched engine exactly.
        """
        images = [
            ImageTokens(
                features=f,
                grid=_square_grid(f.shape[0]),
                cls_attention=cls_attention[i] if cls_attention is not None else None,
            )
            for i, f in enumerate(features)
        ]
        out: list[Optional[torch.Tensor]] = [None] * len(images)
        groups: dict[int, list[int]] = defaultdict(list)
        for i, (image, k) in enumerate(zip(images, counts)):
            if not 1 <= k <= image.num_tokens:
                raise RuntimeError(
                    f"tokenprune: image {i} has {image.num_tokens} tokens but {k} placeholders; "
                    "the processor and the model disagree"
                )
            if k == image.num_tokens:
                out[i] = image.features
            else:
                groups[k].append(i)
        for k, members in groups.items():
            method = dataclasses.replace(self.tokenprune_method, keep=k)
            kept = method.select_batch([images[i] for i in members])
            for i, idx in zip(members, kept):
                rows = method.merge(images[i], idx.to(images[i].features.device))
                if rows.shape[0] != k:
                    # vLLM would silently truncate extra rows (and fail on missing ones).
                    raise RuntimeError(
                        f"tokenprune: {type(method).__name__} returned {rows.shape[0]} rows for image {i}, "
                        f"which has exactly {k} placeholder tokens"
                    )
                out[i] = rows
        # Only the last call's records are kept: a server runs for ever.
        self.tokenprune_stats.records.clear()
        call = self.tokenprune_stats.new_call()
        for i, (image, rows) in enumerate(zip(images, out)):
            self.tokenprune_stats.add(call=call, row=0, image=i, before=image.num_tokens, after=rows.shape[0])
        return out  # type: ignore[return-value]
