"""Per-architecture adapters: where image features appear, how they merge into the sequence, and
where the decoder layers are. Methods never special-case a model; adapters do.

An adapter is chosen by the model's class name (:func:`get_adapter`). Adding an architecture means
adding one :class:`VisionLanguageAdapter` subclass and registering it.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, ClassVar, Optional

import torch

from tokenprune.methods.base import ImageTokens

_ADAPTERS: dict[str, type["ModelAdapter"]] = {}


def register_adapter(*class_names: str):
    def decorator(cls: type["ModelAdapter"]) -> type["ModelAdapter"]:
        for name in class_names:
            _ADAPTERS[name] = cls
        cls.architectures = tuple(class_names)
        return cls

    return decorator


def supported_architectures() -> list[str]:
    return sorted(_ADAPTERS)


def architectures_for_stage(stage: str) -> list[str]:
    """Architectures whose adapter takes methods of ``stage``."""
    return sorted(name for name, cls in _ADAPTERS.items() if stage in cls.stages)


def get_adapter(model: Any) -> "ModelAdapter":
    """The adapter for ``model``; ``NotImplementedError`` naming the supported architectures otherwise."""
    for cls in type(model).__mro__:
        if cls.__name__ in _ADAPTERS:
            return _ADAPTERS[cls.__name__](model)
    raise NotImplementedError(
        f"tokenprune does not support {type(model).__name__}; supported architectures: "
        f"{', '.join(supported_architectures())}"
    )


class ModelAdapter:
    """What every integration needs from a model: its decoder stack and attention internals."""

    architectures: ClassVar[tuple[str, ...]] = ()
    #: stages of methods this architecture can take ("visual", "llm", "prompt", "kv").
    stages: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, model: Any):
        self.model = model

    def inner_model(self) -> Any:
        """The module under the LM head that receives the final ``input_ids`` (after any pre-LLM
        pruning) and the cache: where the decoder runtime detects prefill and decoding steps."""
        return self.model.model

    # -- decoder ------------------------------------------------------------------------------
    def text_model(self) -> Any:
        """The decoder stack (a module with ``.layers``, ``.config``), e.g. ``LlamaModel``."""
        raise NotImplementedError

    @property
    def decoder_layers(self) -> torch.nn.ModuleList:
        return self.text_model().layers

    @property
    def num_layers(self) -> int:
        return len(self.decoder_layers)

    def pad_token_id(self) -> int:
        """Token id used to re-pad rows whose length changed (always masked out)."""
        for source in (getattr(self.model, "generation_config", None), self.model.config,
                       getattr(self.model.config, "text_config", None)):
            value = getattr(source, "pad_token_id", None) if source is not None else None
            if value is not None:
                return int(value[0] if isinstance(value, (list, tuple)) else value)
        return 0

    def attn_implementation(self) -> str:
        return getattr(self.text_model().config, "_attn_implementation", None) or "eager"

    def apply_rotary(self, attention: torch.nn.Module) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
        """``apply_rotary_pos_emb(q, k, cos, sin)`` of the attention module's own architecture."""
        module = sys.modules[type(attention).__module__]
        fn = getattr(module, "apply_rotary_pos_emb", None)
        if fn is None:
            raise NotImplementedError(f"{type(attention).__name__} has no apply_rotary_pos_emb to score with")
        return fn


class VisionLanguageAdapter(ModelAdapter):
    """A model that merges image features into the token sequence at placeholder tokens."""

    stages = frozenset({"visual", "llm"})
    #: generate/forward keyword arguments that carry the raw image input.
    image_input_keys: ClassVar[tuple[str, ...]] = ("pixel_values",)
    #: other generate/forward keyword arguments the image encoder reads (consumed with the images).
    image_option_keys: ClassVar[tuple[str, ...]] = (
        "vision_feature_layer",
        "vision_feature_select_strategy",
        "image_sizes",
    )
    #: keyword arguments aligned with ``input_ids`` (``[B, L]``) that must shrink with it.
    token_aligned_keys: ClassVar[tuple[str, ...]] = ("token_type_ids", "mm_token_type_ids")
    #: keyword arguments that pre-LLM pruning cannot combine with (the adapter would mis-place them).
    unsupported_keys: ClassVar[tuple[str, ...]] = ()
    #: config attributes (top level or ``text_config``) naming tokens that lay the prompt out rather
    #: than say anything: never part of the instruction (:meth:`instruction_embeddings`).
    layout_token_keys: ClassVar[tuple[str, ...]] = (
        "image_token_id",
        "image_token_index",
        "video_token_id",
        "video_token_index",
        "vision_start_token_id",
        "vision_end_token_id",
        "vision_token_id",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
    )

    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)

    def layout_token_ids(self) -> torch.Tensor:
        """Ids of the image placeholder and of every token named by :attr:`layout_token_keys`."""
        ids = {self.image_token_id}
        for source in (self.model.config, getattr(self.model.config, "text_config", None)):
            for key in self.layout_token_keys:
                value = getattr(source, key, None) if source is not None else None
                values = value if isinstance(value, (list, tuple)) else [value]
                ids.update(int(v) for v in values if isinstance(v, int) and not isinstance(v, bool))
        return torch.tensor(sorted(ids), dtype=torch.long)

    def instruction_embeddings(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
        """The instruction each row's images are pruned for (methods that ``require`` ``"instruction"``).

        Args:
            input_ids: ``[B, L]`` the caller's (unpruned) prompt.
            attention_mask: ``[B, L]``; padding is not instruction.

        Returns:
            One ``[M_b, D]`` tensor per row: the row's text tokens (everything but padding, image
            placeholders and the layout tokens of :meth:`layout_token_ids`), embedded by the
            language model's input embedding table, the space the projector maps image tokens
            into. ``M_b`` may be 0. Chat-template words stay in: the adapter cannot tell them
            from the question (OpenVINO GenAI's CDPruner does the same on Qwen-VL).
        """
        text = attention_mask.bool() & ~torch.isin(input_ids, self.layout_token_ids().to(input_ids.device))
        table = self.model.get_input_embeddings()
        with torch.no_grad():  # only ever used to choose tokens
            return [table(row_ids[keep].to(table.weight.device)) for row_ids, keep in zip(input_ids, text)]

    def encode_images(self, inputs: dict[str, Any], requires: frozenset[str]) -> list[ImageTokens]:
        """Run the vision tower + projector on ``inputs``; one :class:`ImageTokens` per image, in the
        order their placeholder blocks appear in the batch (row by row)."""
        raise NotImplementedError

    def encoder_outputs(self, features: list[torch.Tensor]) -> dict[str, Any]:
        """Keyword arguments that make the model use ``features`` (one ``[n_i, D]`` per image) instead
        of encoding images: transformers 5's pre-computed ``mm_encoder_outputs``."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        return {"mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=list(features))}}

    def block_size(self, image: ImageTokens) -> int:
        """Placeholder tokens the image occupies in the prompt (its tokens plus layout tokens)."""
        return image.num_tokens

    def layout(self, image: ImageTokens, kept: torch.Tensor, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(offsets, embeddings)``: which of the image's placeholder slots survive (ascending offsets
        into its block) and the embeddings that fill them. Default: the kept tokens themselves."""
        return kept, features

    def pruned_kwargs(
        self, inputs: dict[str, Any], index: torch.Tensor, attention_mask: torch.Tensor
    ) -> dict[str, Any]:
        """Extra model keyword arguments for the pruned prompt (e.g. positions).

        Args:
            inputs: the caller's ``input_ids``, ``attention_mask`` and image inputs (unpruned).
            index: ``[B, L']`` original position of every slot of the pruned prompt, ``-1`` for padding.
            attention_mask: ``[B, L']`` the pruned prompt's mask.
        """
        return {}

    def image_runs(self, input_ids_row: torch.Tensor) -> list[tuple[int, int]]:
        """``[(start, end), ...]`` of each image's placeholder block in one row."""
        is_image = (input_ids_row == self.image_token_id).to(torch.int8)
        if not bool(is_image.any()):
            return []
        edges = torch.diff(torch.nn.functional.pad(is_image, (1, 1)))
        starts = torch.nonzero(edges == 1).flatten().tolist()
        ends = torch.nonzero(edges == -1).flatten().tolist()
        return list(zip(starts, ends))


@register_adapter("LlavaForConditionalGeneration")
class LlavaAdapter(VisionLanguageAdapter):
    """LLaVA-1.5 (``LlavaForConditionalGeneration``): one contiguous block of placeholders per image,
    a square patch grid, features from ``model.model.get_image_features``. Methods that ``require``
    ``cls_attention`` / ``keys`` / ``flow_layers`` get them from a :class:`ClipProbe` on the CLIP
    tower (the [CLS] row of each layer, from the layer's own q/k/v projections)."""

    #: "prompt" / "kv": prompt and KV pruning (LazyLLM, SnapKV, Knorm) in its Llama decoder, image
    #: tokens included.
    stages = frozenset({"visual", "llm", "prompt", "kv"})

    def text_model(self) -> Any:
        return self.model.model.language_model

    def _grid(self, num_tokens: int) -> Optional[tuple[int, int]]:
        side = int(round(num_tokens ** 0.5))
        return (side, side) if side * side == num_tokens else None

    def _feature_options(self, inputs: dict[str, Any]) -> dict[str, Any]:
        cfg = self.model.config
        layer = inputs.get("vision_feature_layer")
        strategy = inputs.get("vision_feature_select_strategy")
        return {
            "vision_feature_layer": layer if layer is not None else cfg.vision_feature_layer,
            "vision_feature_select_strategy": strategy or cfg.vision_feature_select_strategy,
        }

    def _clip_probe(self, options: dict[str, Any], requires: frozenset[str]):
        from tokenprune.integrations.hf.probes import ClipProbe, feature_layer_index

        tower = self.model.model.vision_tower
        encoder = getattr(tower, "vision_model", tower).encoder  # transformers 5 drops the vision_model level
        layers = [layer.self_attn for layer in encoder.layers]
        return ClipProbe(layers, feature_layer_index(options["vision_feature_layer"], len(layers)), requires)

    def encode_images(self, inputs: dict[str, Any], requires: frozenset[str]) -> list[ImageTokens]:
        from tokenprune.integrations.hf.probes import select_records

        options = self._feature_options(inputs)
        kwargs = {"pixel_values": inputs["pixel_values"], **options}
        if inputs.get("image_sizes") is not None:
            kwargs["image_sizes"] = inputs["image_sizes"]
        with self._clip_probe(options, requires) as probe:
            out = self.model.model.get_image_features(**kwargs, return_dict=True)
        first = 1 if options["vision_feature_select_strategy"] == "default" else 0
        images = []
        for i, f in enumerate(out.pooler_output):
            cls_attention, extras = select_records(
                probe.records, probe.feature_layer, requires, lambda t, i=i, dev=f.device: t[i, first:].to(dev)
            )
            images.append(ImageTokens(features=f, grid=self._grid(f.shape[0]), cls_attention=cls_attention,
                                      extras=extras or None))
        return images



@register_adapter("LlavaNextForConditionalGeneration")
class LlavaNextAdapter(LlavaAdapter):
    """LLaVA-NeXT (``LlavaNextForConditionalGeneration``): any-resolution images.

    An image is its base crop followed by the unpadded high-resolution grid, each grid row closed by
    a learned ``image_newline`` token (a single-crop image: base + one newline). Methods see only the
    image's *content* tokens (base + grid, no newlines) with ``blocks = [(0, side, side), (side^2,
    rows, cols)]``, and ``keep`` budgets the content tokens of the whole image across its crops.
    After selection, a newline survives when its row keeps at least one token, so the decoder still
    reads line breaks where lines remain; newlines are placeholders of the image but not part of
    the budget. The [CLS] statistics of a content token come from its own crop's encoder pass.
    """

    def _packing(self, num_crops: int, tokens_per_crop: int, image_size: torch.Tensor, strategy: str) -> torch.Tensor:
        """Packed order of one image: ``[L]`` with ``crop * T + token`` per content slot, ``-1`` per newline.

        Obtained by running the model's own ``pack_image_features`` on an index tensor, so the
        unpadding always matches the model's."""
        index = torch.arange(num_crops * tokens_per_crop, dtype=torch.float64).view(num_crops, tokens_per_crop, 1)
        packed, _ = self.model.model.pack_image_features(
            [index], image_size[None], strategy, image_newline=torch.tensor([-1.0], dtype=torch.float64)
        )
        return packed[0][:, 0].round().long()

    def encode_images(self, inputs: dict[str, Any], requires: frozenset[str]) -> list[ImageTokens]:
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        from tokenprune.integrations.hf.probes import select_records

        cfg = self.model.config
        options = self._feature_options(inputs)
        image_sizes = inputs["image_sizes"]
        with self._clip_probe(options, requires) as probe:
            out = self.model.model.get_image_features(
                pixel_values=inputs["pixel_values"], image_sizes=image_sizes, return_dict=True, **options
            )
        first = 1 if options["vision_feature_select_strategy"] == "default" else 0
        images, crop_offset = [], 0
        for i, packed in enumerate(out.pooler_output):
            crops = image_size_to_num_patches(
                image_size=image_sizes[i], grid_pinpoints=cfg.image_grid_pinpoints, patch_size=cfg.vision_config.image_size
            )
            per_crop = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2 + (1 - first)
            order = self._packing(crops, per_crop, image_sizes[i], options["vision_feature_select_strategy"])
            newline = order < 0
            content = torch.nonzero(~newline).flatten()
            source = order[content]  # crop * T + token of each content token
            layout = {"order": order.to(packed.device), "content": content.to(packed.device)}
            side = int(round(per_crop ** 0.5))
            blocks = None
            if side * side == per_crop:
                blocks = [(0, side, side)]
                rest, rows = content.numel() - per_crop, int(newline.sum())
                if crops > 1 and rows and rest % rows == 0:
                    blocks.append((per_crop, rows, rest // rows))
            if crops > 1:
                # Row of each content token: the number of newlines before it; base tokens have none.
                row = torch.cumsum(newline.long(), 0)[content]
                row[:per_crop] = -1
            else:
                row = torch.zeros(content.numel(), dtype=torch.long)
            layout["row"] = row.to(packed.device)

            def pick(t: torch.Tensor, lo=crop_offset, n=crops, src=source, dev=packed.device) -> torch.Tensor:
                flat = t[lo : lo + n, first:]
                return flat.reshape(n * flat.shape[1], *flat.shape[2:])[src.to(flat.device)].to(dev)

            cls_attention, extras = select_records(probe.records, probe.feature_layer, requires, pick)
            extras["_layout"] = layout
            images.append(
                ImageTokens(features=packed[content.to(packed.device)], grid=(side, side) if crops == 1 and blocks else None,
                            cls_attention=cls_attention, extras=extras, blocks=blocks)
            )
            crop_offset += crops
        return images

    def block_size(self, image: ImageTokens) -> int:
        return int(image.extras["_layout"]["order"].numel())

    def layout(self, image: ImageTokens, kept: torch.Tensor, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        info = image.extras["_layout"]
        order, content, row = info["order"], info["content"], info["row"]
        newline_slots = torch.nonzero(order < 0).flatten()
        kept_rows = torch.unique(row[kept])
        keep_newline = torch.isin(torch.arange(newline_slots.numel(), device=kept.device), kept_rows)
        offsets = torch.cat([content[kept], newline_slots[keep_newline]])
        offsets, perm = torch.sort(offsets)
        newline = self.model.model.image_newline.to(features.dtype)[None].expand(int(keep_newline.sum()), -1)
        return offsets, torch.cat([features, newline])[perm]



@register_adapter("Qwen2_5_VLForConditionalGeneration", "Qwen2VLForConditionalGeneration")
class QwenVLAdapter(VisionLanguageAdapter):
    """Qwen2-VL / Qwen2.5-VL: pruning after the vision merger (one token = 2x2 merged patches).

    Statistics come from the mean-query probe on every vision block (the last block is the feature
    layer); a merged token's value is the mean over its four patches. Qwen2.5-VL's window attention
    reorders patches inside the tower; the probe's records are put back in merged-token order.

    Positions: the kept tokens keep their original 3-D M-RoPE positions. The adapter computes the
    full prompt's positions with the model's own ``get_rope_index``, gathers the kept slots and
    passes ``position_ids`` ``[4, B, L']`` (row 0: the pruned prompt's text positions, as generate
    builds them) to the model; generate then continues every row by ``last + 1``, so decoding uses the
    same positions as the unpruned model. ``rope_deltas`` is set to the pruned prompt's value
    (``max position + 1 - kept length``) so later calls without ``position_ids`` agree.
    """

    image_input_keys = ("pixel_values",)
    image_option_keys = ("image_grid_thw",)
    unsupported_keys = ("pixel_values_videos", "video_grid_thw")

    def text_model(self) -> Any:
        return self.model.model.language_model

    def encode_images(self, inputs: dict[str, Any], requires: frozenset[str]) -> list[ImageTokens]:
        from tokenprune.integrations.hf.probes import MeanQueryProbe, select_records

        visual = self.model.model.visual
        grid_thw = inputs["image_grid_thw"]
        merge = visual.spatial_merge_size
        unit = merge * merge
        sizes = (grid_thw.prod(-1)).tolist()
        bounds = [0]
        for n in sizes:
            bounds.append(bounds[-1] + int(n))
        segments = list(zip(bounds[:-1], bounds[1:]))
        layers = [block.attn for block in visual.blocks]
        with MeanQueryProbe(layers, len(layers) - 1, requires, segments) as probe:
            out = self.model.model.get_image_features(inputs["pixel_values"], grid_thw, return_dict=True)
        order = None
        if probe.records and hasattr(visual, "fullatt_block_indexes"):
            from transformers.vision_utils import get_vision_window_index

            window_index, _ = get_vision_window_index(
                grid_thw, spatial_merge_size=merge, window_size=visual.window_size, patch_size=visual.patch_size
            )
            order = torch.argsort(window_index)

        def merged(t: torch.Tensor) -> torch.Tensor:
            """Packed patch records (window order) -> per merged token (original order)."""
            t = t.reshape(t.shape[0] // unit, unit, *t.shape[1:])
            if order is not None:
                t = t[order.to(t.device)]
            return t.mean(dim=1)

        records = {i: {k: merged(v) for k, v in rec.items()} for i, rec in probe.records.items()}
        images, start = [], 0
        for i, f in enumerate(out.pooler_output):
            t, h, w = (int(x) for x in grid_thw[i])
            n = f.shape[0]
            cls_attention, extras = select_records(
                records, probe.feature_layer, requires, lambda x, a=start, b=start + n, dev=f.device: x[a:b].to(dev)
            )
            if probe.records and "flow_layers" in extras:
                extras["flow_final_layer"] = len(layers) - 1  # FlowCut-Qwen cuts last after the final block
            grid = (h // merge, w // merge) if t == 1 else None
            images.append(ImageTokens(features=f, grid=grid, cls_attention=cls_attention, extras=extras or None))
            start += n
        return images


    def pruned_kwargs(self, inputs: dict[str, Any], index: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, Any]:
        input_ids = inputs["input_ids"]
        original_mask = inputs.get("attention_mask")
        token_types = inputs.get("mm_token_type_ids")
        if token_types is None:
            token_types = (input_ids == self.image_token_id).to(torch.int)
        full, _ = self.model.model.get_rope_index(
            input_ids,
            mm_token_type_ids=token_types,
            image_grid_thw=inputs.get("image_grid_thw"),
            attention_mask=original_mask,
        )
        valid = index >= 0
        gathered = torch.gather(full, 2, index.clamp_min(0)[None].expand(3, -1, -1))
        gathered = gathered.masked_fill(~valid[None], 0)
        text = attention_mask.long().cumsum(-1) - 1
        text = text.masked_fill(attention_mask == 0, 0)
        position_ids = torch.cat([text[None], gathered], dim=0)
        top = gathered.masked_fill(~valid[None], -1).amax(dim=(0, 2))
        self.model.model.rope_deltas = (top + 1 - valid.sum(dim=1)).unsqueeze(1)
        return {"position_ids": position_ids}


@register_adapter("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")
class CausalLMAdapter(ModelAdapter):
    """Llama-family text decoders (``model.model`` holds ``layers``, ``rotary_emb``, ``config``):
    prompt / KV pruning (LazyLLM, SnapKV, Knorm)."""

    stages = frozenset({"prompt", "kv"})

    def text_model(self) -> Any:
        return self.model.model
