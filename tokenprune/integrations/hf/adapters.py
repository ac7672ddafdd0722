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
    #: stages of methods this architecture can take ("visual", "llm", "text", ...).
    stages: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, model: Any):
        self.model = model

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

    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)

    def encode_images(self, inputs: dict[str, Any], requires: frozenset[str]) -> list[ImageTokens]:
        """Run the vision tower + projector on ``inputs``; one :class:`ImageTokens` per image, in the
        order their placeholder blocks appear in the batch (row by row)."""
        raise NotImplementedError

    def encoder_outputs(self, features: list[torch.Tensor]) -> dict[str, Any]:
        """Keyword arguments that make the model use ``features`` instead of encoding images."""
        raise NotImplementedError

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
    a square patch grid, features from ``model.model.get_image_features``."""

    def text_model(self) -> Any:
        return self.model.model.language_model

    def _grid(self, num_tokens: int) -> Optional[tuple[int, int]]:
        side = int(round(num_tokens ** 0.5))
        return (side, side) if side * side == num_tokens else None

    def encode_images(self, inputs: dict[str, Any], requires: frozenset[str]) -> list[ImageTokens]:
        cfg = self.model.config
        kwargs = {
            "pixel_values": inputs["pixel_values"],
            "vision_feature_layer": inputs.get("vision_feature_layer") or cfg.vision_feature_layer,
            "vision_feature_select_strategy": inputs.get("vision_feature_select_strategy")
            or cfg.vision_feature_select_strategy,
        }
        if inputs.get("image_sizes") is not None:
            kwargs["image_sizes"] = inputs["image_sizes"]
        out = self.model.model.get_image_features(**kwargs, return_dict=True)
        return [ImageTokens(features=f, grid=self._grid(f.shape[0])) for f in out.pooler_output]

    def encoder_outputs(self, features: list[torch.Tensor]) -> dict[str, Any]:
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        return {"mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=list(features))}}
