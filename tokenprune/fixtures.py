"""Tiny random checkpoints built offline: a trained BPE tokenizer, Llama and LLaVA models.

Nothing is downloaded. The checkpoints serve the tests, the benchmark presets and the vLLM tests:

* the tokenizer is a byte-level BPE trained with ``tokenizers`` on an in-memory corpus, with the
  special tokens ``<unk> <s> </s> <pad> <image>`` and a chat template;
* weights are random with a large ``initializer_range`` (0.3 in the decoder by default): with the
  usual 0.02 a random decoder emits the same token whatever the input, and "same output" tests
  would pass vacuously;
* LLaVA checkpoints are written in the classic llava-hf key layout (``vision_tower.vision_model.*``)
  that vLLM's loader requires; transformers loads it too (DESIGN.md §5);
* head dimensions are 32/64 so the same checkpoints run on vLLM's CPU attention.

Building a checkpoint takes a few seconds; :func:`build_tiny_llava` and :func:`build_tiny_llama`
are deterministic for a given seed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import torch

__all__ = [
    "SPECIAL_TOKENS",
    "CHAT_TEMPLATE",
    "build_tokenizer",
    "build_tiny_llama",
    "build_tiny_llava",
    "build_tiny_causal_lm",
    "tiny_llama_config",
    "tiny_llava_config",
    "make_image",
    "build_tiny_llava_next",
    "build_tiny_qwen2_5_vl",
    "build_tiny_qwen2_vl",
]

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
IMAGE_TOKEN = "<image>"
QWEN_VIDEO_TOKEN = "<|video_pad|>"

# A LLaVA-1.5 style template that also renders `documents=` (the transformers RAG convention).
CHAT_TEMPLATE = (
    "{% if documents %}{% for doc in documents %}DOCUMENT {{ loop.index }}: "
    "{% if doc is mapping %}{% if doc.title %}{{ doc.title }}{{ '\\n' }}{% endif %}{{ doc.text }}{% else %}{{ doc }}{% endif %}{{ '\\n' }}"
    "{% endfor %}{% endif %}"
    "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] }}{{ '\\n' }}"
    "{% else %}{{ message['role'].upper() }}: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>{{ '\\n' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}{{ '\\n' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

_CORPUS_WORDS = (
    "the a an of to in is on for with as by at from that this it be are was were what which who where when how "
    "image picture photo shows contains describe color red green blue yellow black white orange purple circle "
    "square triangle left right top bottom middle corner near far above below next large small many few one two "
    "three four five six seven eight nine ten question answer user assistant system document passage title text "
    "model token tokens prune pruning vision language cat dog car tree house city street sky river mountain "
    "hello world quick brown fox jumps over lazy dog lorem ipsum dolor sit amet consectetur adipiscing elit "
    "def return import class self if else for while print true false none 0 1 2 3 4 5 6 7 8 9"
).split()


def _corpus(seed: int = 0, lines: int = 400) -> list[str]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(lines):
        n = int(torch.randint(4, 16, (1,), generator=gen))
        idx = torch.randint(0, len(_CORPUS_WORDS), (n,), generator=gen).tolist()
        out.append(" ".join(_CORPUS_WORDS[i] for i in idx).capitalize() + ".")
    return out + [" ".join(_CORPUS_WORDS)]


def build_tokenizer(vocab_size: int = 512, seed: int = 0):
    """A ``PreTrainedTokenizerFast`` with a byte-level BPE trained offline (``<image>`` = id 4)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(seed), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        padding_side="left",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_llama_config(
    vocab_size: int = 512,
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 2,
    num_kv_heads: Optional[int] = None,
    intermediate_size: int = 256,
    initializer_range: float = 0.3,
    max_position_embeddings: int = 4096,
    **overrides: Any,
):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads or num_heads,
        max_position_embeddings=max_position_embeddings,
        initializer_range=initializer_range,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        tie_word_embeddings=False,
        **overrides,
    )


def tiny_llava_config(
    image_size: int = 56,
    patch_size: int = 14,
    vision_hidden_size: int = 64,
    vision_layers: int = 2,
    vision_heads: int = 2,
    text_config: Any = None,
    **text_overrides: Any,
):
    """``LlavaConfig`` with a CLIP vision tower: ``(image_size / patch_size) ** 2`` image tokens."""
    from transformers import CLIPVisionConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=vision_hidden_size,
        intermediate_size=vision_hidden_size * 2,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=vision_hidden_size,
        initializer_range=0.1,
    )
    text = text_config if text_config is not None else tiny_llama_config(**text_overrides)
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=SPECIAL_TOKENS.index(IMAGE_TOKEN),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        image_seq_length=(image_size // patch_size) ** 2,
        pad_token_id=3,
    )


def _save_tokenizer_config(path: Path) -> None:
    # transformers 5 writes "TokenizersBackend", which older readers (vLLM's pinned range) may not know.
    cfg_path = path / "tokenizer_config.json"
    if cfg_path.exists():
        cfg = json.loads(cfg_path.read_text())
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        cfg_path.write_text(json.dumps(cfg, indent=2))


def _save_checkpoint(path: Path, model: Any, processor: Any, classic_llava_keys: bool = False) -> Path:
    """Save ``model`` and its tokenizer/processor under ``path`` the way every fixture is saved."""
    model.generation_config.pad_token_id = 3
    model.save_pretrained(path)
    if classic_llava_keys:
        _rewrite_classic_llava_keys(path)
    processor.save_pretrained(path)
    _save_tokenizer_config(path)
    return path


# LlavaProcessor / LlavaNextProcessor arguments shared by the LLaVA-family fixtures.
_LLAVA_PROCESSOR_KWARGS = {
    "vision_feature_select_strategy": "default",
    "num_additional_image_tokens": 1,
    "chat_template": CHAT_TEMPLATE,
    "image_token": IMAGE_TOKEN,
}


def build_tiny_llama(path: str | os.PathLike, seed: int = 0, dtype: torch.dtype = torch.float32, **config: Any) -> Path:
    """Save a random ``LlamaForCausalLM`` + tokenizer under ``path`` and return it."""
    from transformers import LlamaForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**config)).to(dtype).eval()
    return _save_checkpoint(path, model, build_tokenizer())


def _rewrite_classic_llava_keys(path: Path) -> None:
    """transformers 5 saves CLIP weights as ``vision_tower.<x>``; vLLM wants ``vision_tower.vision_model.<x>``."""
    from safetensors.torch import load_file, save_file

    for file in sorted(path.glob("*.safetensors")):
        tensors = load_file(str(file))
        renamed = {}
        for key, value in tensors.items():
            head, sep, rest = key.partition("vision_tower.")
            if sep and not rest.startswith("vision_model."):
                key = f"{head}vision_tower.vision_model.{rest}"
            renamed[key] = value.contiguous()
        save_file(renamed, str(file), metadata={"format": "pt"})


def build_tiny_llava(
    path: str | os.PathLike,
    image_size: int = 56,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    **config: Any,
) -> Path:
    """Save a random ``LlavaForConditionalGeneration`` + ``LlavaProcessor`` under ``path``.

    ``image_size=56`` gives 16 image tokens per image, ``336`` the LLaVA-1.5 count of 576.
    Extra keyword arguments go to :func:`tiny_llava_config` (e.g. ``num_layers=``, ``hidden_size=``).
    """
    from transformers import CLIPImageProcessor, LlavaForConditionalGeneration, LlavaProcessor

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    cfg = tiny_llava_config(image_size=image_size, **config)
    model = LlavaForConditionalGeneration(cfg).to(dtype).eval()
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_center_crop=True,
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(),
        patch_size=cfg.vision_config.patch_size,
        **_LLAVA_PROCESSOR_KWARGS,
    )
    return _save_checkpoint(path, model, processor, classic_llava_keys=True)


def make_image(size: int, seed: int = 0):
    """A deterministic random RGB ``PIL.Image`` of ``size`` x ``size`` pixels with some structure."""
    from PIL import Image

    gen = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, 256, (3, 4, 4), generator=gen, dtype=torch.uint8).float()
    img = torch.nn.functional.interpolate(coarse[None], size=(size, size), mode="bilinear", align_corners=False)[0]
    img = (img + torch.randint(-40, 40, (3, size, size), generator=gen)).clamp(0, 255).to(torch.uint8)
    return Image.fromarray(img.permute(1, 2, 0).numpy())


def build_tiny_llava_next(
    path: str | os.PathLike,
    crop_size: int = 56,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    **config: Any,
) -> Path:
    """Save a random ``LlavaNextForConditionalGeneration`` + ``LlavaNextProcessor`` under ``path``.

    Crops of ``crop_size`` px (56: 16 tokens per crop) on the grid pinpoints ``1x2, 2x1, 2x2`` crops:
    an image becomes its base crop plus an unpadded high-resolution grid with one newline token per
    row (a square image: 16 + 64 + 8 = 88 placeholders). Extra keyword arguments go to the text config.
    Saved in the classic key layout: vLLM (CPU) loads it and its greedy output equals transformers'.
    """
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextImageProcessor, LlavaNextProcessor

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    base = tiny_llava_config(image_size=crop_size, **config)
    pinpoints = [[crop_size, 2 * crop_size], [2 * crop_size, crop_size], [2 * crop_size, 2 * crop_size]]
    cfg = LlavaNextConfig(
        vision_config=base.vision_config,
        text_config=base.text_config,
        image_token_index=SPECIAL_TOKENS.index(IMAGE_TOKEN),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_grid_pinpoints=pinpoints,
        image_seq_length=(crop_size // 14) ** 2,
        pad_token_id=3,
    )
    model = LlavaNextForConditionalGeneration(cfg).to(dtype).eval()
    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": crop_size},
        crop_size={"height": crop_size, "width": crop_size},
        image_grid_pinpoints=pinpoints,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(),
        patch_size=14,
        **_LLAVA_PROCESSOR_KWARGS,
    )
    return _save_checkpoint(path, model, processor, classic_llava_keys=True)


def build_tiny_qwen2_5_vl(
    path: str | os.PathLike,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 2,
    vision_depth: int = 4,
    initializer_range: float = 0.3,
    version: str = "2.5",
    max_pixels: int = 224 * 224,
) -> Path:
    """Save a random ``Qwen2_5_VLForConditionalGeneration`` + ``Qwen2_5_VLProcessor`` under ``path``.

    Text head_dim 64 by default (vLLM's CPU attention accepts it) with M-RoPE sections ``[8, 12, 12]``; a
    4-block vision tower (head_dim 32, full attention in blocks 1 and 3, windows of 2x2 merged tokens
    elsewhere) with 14 px patches merged 2x2: a 112x112 image gives 16 visual tokens, 112x168 gives 24.
    The image placeholder is ``<image>`` (id 4), as in the other fixtures; ``<|video_pad|>`` is added
    to the vocabulary because the processors (HF and vLLM) look it up. vLLM (CPU) loads the checkpoint
    and its greedy output equals transformers'. ``version="2"`` builds the
    Qwen2-VL equivalent (full attention in every vision block, no window reordering).
    """
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLProcessor,
    )
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    head_dim = hidden_size // num_heads
    if head_dim % 16:
        raise ValueError(f"hidden_size / num_heads must be a multiple of 16 (M-RoPE sections), got {head_dim}")
    tokenizer = build_tokenizer()
    # Qwen processors (HF and vLLM) look up a video placeholder even for image-only prompts.
    tokenizer.add_tokens([QWEN_VIDEO_TOKEN], special_tokens=True)
    video_token_id = tokenizer.convert_tokens_to_ids(QWEN_VIDEO_TOKEN)
    text = {
        "vocab_size": 8 * ((len(tokenizer) + 7) // 8),
        "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_heads,
        "max_position_embeddings": 4096,
        "initializer_range": initializer_range,
        # M-RoPE sections (t, h, w) over head_dim / 2 in Qwen's 1/4, 3/8, 3/8 proportions ([8, 12, 12] at 64).
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                            "mrope_section": [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16]},
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 3,
    }
    vision = {
        "depth": vision_depth,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_heads": 2,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 56,
        "out_hidden_size": hidden_size,
        "fullatt_block_indexes": [1, 3],
        "initializer_range": 0.1,
    }
    if version not in ("2", "2.5"):
        raise ValueError(f"version must be '2' or '2.5', got {version!r}")
    if version == "2":
        vision = {
            "depth": vision_depth, "embed_dim": 64, "hidden_size": hidden_size, "num_heads": 2, "mlp_ratio": 2,
            "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "initializer_range": 0.1,
        }
    config_cls, model_cls, processor_cls = (
        (Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor)
        if version == "2"
        else (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor)
    )
    cfg = config_cls(
        text_config=text,
        vision_config=vision,
        image_token_id=SPECIAL_TOKENS.index(IMAGE_TOKEN),
        video_token_id=video_token_id,
        vision_start_token_id=1,
        vision_end_token_id=2,
        tie_word_embeddings=False,
    )
    model = model_cls(cfg).to(dtype).eval()
    model.generation_config.eos_token_id = 2
    image_processor = Qwen2VLImageProcessor(
        min_pixels=56 * 56, max_pixels=max_pixels, patch_size=14, merge_size=2, temporal_patch_size=2
    )
    video_processor = Qwen2VLVideoProcessor(patch_size=14, merge_size=2, temporal_patch_size=2)
    processor = processor_cls(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )
    return _save_checkpoint(path, model, processor)


def build_tiny_qwen2_vl(path: str | os.PathLike, **kwargs: Any) -> Path:
    """Tiny ``Qwen2VLForConditionalGeneration`` (see :func:`build_tiny_qwen2_5_vl`)."""
    return build_tiny_qwen2_5_vl(path, version="2", **kwargs)


def build_tiny_causal_lm(path: str | os.PathLike, arch: str = "llama", seed: int = 0,
                         dtype: torch.dtype = torch.float32, **config: Any) -> Path:
    """Save a random Llama / Qwen2 / Mistral causal LM + tokenizer under ``path`` (``arch`` names it).

    Same shape knobs as :func:`tiny_llama_config`; Mistral is built without a sliding window.
    """
    if arch == "llama":
        return build_tiny_llama(path, seed=seed, dtype=dtype, **config)
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    classes = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "mistral": (MistralConfig, MistralForCausalLM)}
    if arch not in classes:
        raise ValueError(f"arch must be one of llama, {', '.join(classes)}, got {arch!r}")
    config_cls, model_cls = classes[arch]
    extra = {"sliding_window": None} if arch == "mistral" else {}
    cfg = config_cls(**{**tiny_llama_config(**config).to_diff_dict(), **extra})
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = model_cls(cfg).to(dtype).eval()
    return _save_checkpoint(path, model, build_tokenizer())

from tokenprune.real_weights import load_real_lm, real_lm  # noqa: E402,F401  (real pretrained weights, issue 17)
