"""Model presets of tokenprune-bench: real architecture shapes with random weights, built offline.

Random weights make latency real and output quality meaningless. CPU presets (``tiny-llava``,
``medium-llava``) are built in memory in fp32 in seconds; GPU presets reproduce the shapes of
public 7-8B checkpoints and are built directly on the GPU in bf16, never saved (building one on
CPU would take minutes and tens of GB, so the CLI refuses).

A local checkpoint directory is accepted wherever a preset name is (:func:`load_model`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

__all__ = ["Preset", "PRESETS", "DEFAULT_PRESET", "get_preset", "LoadedModel", "load_model", "count_parameters"]

# family -> transformers class name (resolved lazily).
FAMILY_CLASSES = {
    "llava": "LlavaForConditionalGeneration",
    "llava_next": "LlavaNextForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "llama": "LlamaForCausalLM",
}
IMAGE_FAMILIES = ("llava", "llava_next", "qwen2_5_vl")


@dataclass(frozen=True)
class Preset:
    """A named model shape.

    Attributes:
        name: CLI name.
        family: key of ``FAMILY_CLASSES``.
        description: one line for ``tokenprune-bench models``.
        gpu_only: refuse to build on CPU.
        make_config: ``make_config(image_size) -> transformers config`` (``image_size`` may be None
            for the preset's own; text presets ignore it).
        image_size: default image side in pixels (None for text models).
    """

    name: str
    family: str
    description: str
    gpu_only: bool
    make_config: Callable[[Optional[int]], Any]
    image_size: Optional[int] = None


def _patch_multiple(image_size: int, patch: int = 14) -> int:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < patch or image_size % patch:
        raise ValueError(f"image_size must be a positive multiple of the patch size {patch}, got {image_size!r}")
    return image_size


def _tiny_llava(image_size: Optional[int]) -> Any:
    from tokenprune.fixtures import tiny_llava_config

    # Decoder wide enough that prefill dominates the (tiny) vision tower, the projector and the
    # selection itself, so pruning pays as it does on real models; still ~7M parameters.
    return tiny_llava_config(
        image_size=_patch_multiple(image_size or 336),
        hidden_size=384,
        num_layers=4,
        num_heads=6,
        intermediate_size=1024,
    )


def _medium_llava(image_size: Optional[int]) -> Any:
    from tokenprune.fixtures import tiny_llava_config

    # ~140M parameters: a 12-layer 768-wide Llama decoder with a 32k vocabulary behind a 4-layer
    # 256-wide CLIP tower: like LLaVA-1.5 (CLIP-L is ~5% of the decoder), the vision tower is a
    # small fixed cost beside the decoder's prefill.
    return tiny_llava_config(
        image_size=_patch_multiple(image_size or 336),
        vision_hidden_size=256,
        vision_layers=4,
        vision_heads=4,
        hidden_size=768,
        num_layers=12,
        num_heads=12,
        intermediate_size=2048,
        vocab_size=32000,
        initializer_range=0.02,
    )


def _clip_large(image_size: int) -> Any:
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=image_size,
        patch_size=14,
        projection_dim=768,
        hidden_act="quick_gelu",
    )


def _llama2_7b(vocab_size: int = 32064) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        pad_token_id=0,
    )


def _llava15_7b(image_size: Optional[int]) -> Any:
    from transformers import LlavaConfig

    image_size = _patch_multiple(image_size or 336)
    return LlavaConfig(
        vision_config=_clip_large(image_size),
        text_config=_llama2_7b(),
        image_token_id=32000,
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=(image_size // 14) ** 2,
        pad_token_id=32001,
    )


def _llava_next_7b(image_size: Optional[int]) -> Any:
    from transformers import LlavaNextConfig

    return LlavaNextConfig(
        vision_config=_clip_large(336),
        text_config=_llama2_7b(),
        image_token_id=32000,
        image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=576,
        pad_token_id=32001,
    )


def _qwen25_vl_7b(image_size: Optional[int]) -> Any:
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig(
        text_config={
            "vocab_size": 152064,
            "hidden_size": 3584,
            "intermediate_size": 18944,
            "num_hidden_layers": 28,
            "num_attention_heads": 28,
            "num_key_value_heads": 4,
            "max_position_embeddings": 128000,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
            "tie_word_embeddings": False,
        },
        vision_config={
            "depth": 32,
            "hidden_size": 1280,
            "intermediate_size": 3420,
            "num_heads": 16,
            "out_hidden_size": 3584,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "window_size": 112,
            "fullatt_block_indexes": [7, 15, 23, 31],
        },
        image_token_id=151655,
        vision_start_token_id=151652,
        tie_word_embeddings=False,
    )


def _llama3_8b(image_size: Optional[int]) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        bos_token_id=128000,
        eos_token_id=128001,
    )


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset("tiny-llava", "llava", "LLaVA-1.5 layout, 576 image tokens, 4x384 decoder (~7M params; CPU, seconds)",
               False, _tiny_llava, 336),
        Preset("medium-llava", "llava", "LLaVA-1.5 layout, 576 image tokens, 12x768 decoder + 4-layer CLIP "
               "(~140M params; CPU)", False, _medium_llava, 336),
        Preset("llava-1.5-7b", "llava",
               "LLaVA-1.5-7B shape: CLIP ViT-L/14-336 + Llama-2-7B, 576 image tokens (GPU, bf16)",
               True, _llava15_7b, 336),
        Preset("llava-next-7b", "llava_next", "LLaVA-NeXT-7B shape: anyres CLIP-L/336 tiles + Llama-2-7B (GPU, bf16)",
               True, _llava_next_7b, 672),
        Preset("qwen2.5-vl-7b", "qwen2_5_vl", "Qwen2.5-VL-7B shape: 32-layer window ViT + 28-layer Qwen2 decoder "
               "(GPU, bf16)", True, _qwen25_vl_7b, 672),
        Preset("llama-3-8b", "llama", "Llama-3-8B shape, text only (GPU, bf16; text mode)", True, _llama3_8b, None),
    ]
}
DEFAULT_PRESET = "tiny-llava"


def get_preset(name: str) -> Preset:
    """The preset called ``name``; ``ValueError`` listing the presets otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(
            f"unknown model {name!r}: not a preset ({', '.join(PRESETS)}) nor an existing checkpoint directory"
        ) from None


def count_parameters(config: Any, family: str) -> int:
    """Parameter count of a config, built on the meta device (no memory, no time)."""
    import transformers

    cls = getattr(transformers, FAMILY_CLASSES[family])
    with torch.device("meta"):
        model = cls(config)
    return sum(p.numel() for p in model.parameters())


@dataclass
class LoadedModel:
    """A model ready to benchmark and what the input builders need to know about it."""

    model: Any
    name: str
    family: str
    random_weights: bool
    device: torch.device
    dtype: torch.dtype
    image_size: Optional[int]

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {device!r}")
    return dev


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str, device: torch.device, gpu_preset: bool) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if (device.type == "cuda" and gpu_preset) else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {dtype!r}")
    return DTYPES[dtype]


def check_buildable(name: str, device: torch.device) -> Optional[Preset]:
    """The preset for ``name`` (None for a checkpoint directory); refuses GPU presets on CPU."""
    if Path(name).is_dir():
        return None
    preset = get_preset(name)
    if preset.gpu_only and device.type != "cuda":
        raise ValueError(
            f"preset {name!r} is GPU-scale (built in bf16 on the GPU); no CUDA device here. "
            f"CPU presets: {', '.join(p.name for p in PRESETS.values() if not p.gpu_only)}"
        )
    return preset


def load_model(name: str, device: torch.device, dtype: str = "auto", image_size: Optional[int] = None,
               seed: int = 0) -> LoadedModel:
    """Build a preset (random weights, directly on ``device``) or load a checkpoint directory.

    Raises:
        ValueError: unknown preset, GPU preset without CUDA, bad image size or dtype.
    """
    import transformers

    preset = check_buildable(name, device)
    if preset is None:  # a local checkpoint
        config = transformers.AutoConfig.from_pretrained(name)
        arch = (getattr(config, "architectures", None) or [""])[0]
        family = next((f for f, cls in FAMILY_CLASSES.items() if cls == arch), None)
        if family is None:
            raise ValueError(f"checkpoint {name!r} is a {arch or 'model of unknown architecture'}; tokenprune-bench "
                             f"handles {', '.join(FAMILY_CLASSES.values())}")
        torch_dtype = resolve_dtype(dtype, device, gpu_preset=True)
        model = getattr(transformers, arch).from_pretrained(name, dtype=torch_dtype).to(device).eval()
        native = getattr(getattr(config, "vision_config", None), "image_size", None)
        if image_size is not None and family == "llava" and image_size != native:
            raise ValueError(f"image_size {image_size} differs from the checkpoint's vision tower ({native})")
        return LoadedModel(model, str(name), family, False, device, torch_dtype, image_size or native)

    torch_dtype = resolve_dtype(dtype, device, preset.gpu_only)
    if image_size is not None and preset.family not in IMAGE_FAMILIES:
        raise ValueError(f"preset {preset.name!r} is a text model; --image-size does not apply")
    config = preset.make_config(image_size)
    cls = getattr(transformers, FAMILY_CLASSES[preset.family])
    torch.manual_seed(seed)
    # Built straight on the target device in the target dtype: a 7B model never exists in fp32 on CPU.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch_dtype)
    try:
        with torch.device(device):
            model = cls(config)
    finally:
        torch.set_default_dtype(previous)
    model.eval()
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = getattr(config, "pad_token_id", None) or 0
    return LoadedModel(model, preset.name, preset.family, True, device, torch_dtype,
                       (image_size or preset.image_size) if preset.family in IMAGE_FAMILIES else None)
