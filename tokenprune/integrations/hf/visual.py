"""Pre-LLM visual pruning in Hugging Face models (DivPrune, HoloV, VisionZip, ...).

The method picks which visual tokens of each image reach the decoder *before* anything is
decoded, so the prompt itself gets shorter: ``generate`` (and a direct forward pass) are wrapped to

1. encode the images once (vision tower + projector, through the adapter),
2. let the method select (and possibly merge) each image's tokens,
3. rewrite ``input_ids``/``attention_mask`` so each image keeps exactly as many placeholder
   tokens as the method kept (rows re-padded on the side they were padded on),
4. hand the selected embeddings to the model as pre-computed encoder outputs.

The decoder and its KV cache therefore only ever see the kept tokens. Positions are re-indexed:
the decoder sees a shorter, contiguous prompt, as DivPrune/VisionZip do in their public code.
``generate`` returns the caller's *original* prompt ids followed by the new tokens, exactly as the
unpatched model does, so slicing ``out[:, prompt_len:]`` keeps working.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Optional

import torch

from tokenprune.integrations.hf.adapters import VisionLanguageAdapter
from tokenprune.methods.base import ImageTokens, VisualPruner
from tokenprune.patching import PatchHandle


@dataclass
class PrunedInputs:
    input_ids: torch.Tensor  # [B, L'] re-padded
    attention_mask: torch.Tensor  # [B, L']
    encoder_kwargs: dict[str, Any]


def _padding_side(attention_mask: torch.Tensor) -> str:
    """'right' only when some row is padded at the end and none at the start."""
    if attention_mask.shape[1] == 0:
        return "left"
    left = bool((attention_mask[:, 0] == 0).any())
    right = bool((attention_mask[:, -1] == 0).any())
    return "right" if right and not left else "left"


def assign_images_to_runs(adapter: VisionLanguageAdapter, input_ids: torch.Tensor, images: list[ImageTokens]):
    """Map images (in batch order) to their placeholder blocks: ``[(row, start, end, image_idx)]``.

    Adjacent images without a separator form one placeholder run; it is split by image size.
    """
    placements = []
    next_image = 0
    for row in range(input_ids.shape[0]):
        for start, end in adapter.image_runs(input_ids[row]):
            pos = start
            while pos < end:
                if next_image >= len(images):
                    raise ValueError(
                        f"the prompt has more image placeholder tokens than the {len(images)} image(s) provide"
                    )
                n = images[next_image].num_tokens
                if pos + n > end:
                    raise ValueError(
                        f"image {next_image} has {n} tokens but its placeholder block in row {row} has "
                        f"{end - pos}; the prompt and the images do not match"
                    )
                placements.append((row, pos, pos + n, next_image))
                pos += n
                next_image += 1
    if next_image != len(images):
        raise ValueError(f"{len(images)} image(s) were given but the prompt has placeholders for {next_image}")
    return placements


def prune_inputs(
    handle: PatchHandle,
    adapter: VisionLanguageAdapter,
    method: VisualPruner,
    input_ids: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    image_inputs: dict[str, Any],
) -> PrunedInputs:
    """Encode, select and rewrite one batch (steps 1-4 of the module docstring)."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    images = adapter.encode_images(image_inputs, method.requires)
    placements = assign_images_to_runs(adapter, input_ids, images)
    kept = method.select_batch(images)
    features = [method.merge(image, idx) for image, idx in zip(images, kept)]

    call = handle.stats.new_call()
    rows_ids, rows_mask = [], []
    by_row: dict[int, list[tuple[int, int, int]]] = {}
    for row, start, end, image_idx in placements:
        by_row.setdefault(row, []).append((start, end, image_idx))
    image_in_row: dict[int, int] = {}
    for row in range(input_ids.shape[0]):
        pieces_ids, pieces_mask, cursor = [], [], 0
        for start, end, image_idx in by_row.get(row, []):
            n_kept = features[image_idx].shape[0]
            pieces_ids += [input_ids[row, cursor:start], input_ids.new_full((n_kept,), adapter.image_token_id)]
            pieces_mask += [attention_mask[row, cursor:start], attention_mask.new_ones(n_kept)]
            cursor = end
            slot = image_in_row.get(row, 0)
            image_in_row[row] = slot + 1
            handle.stats.add(call=call, row=row, image=slot, before=end - start, after=n_kept)
        pieces_ids.append(input_ids[row, cursor:])
        pieces_mask.append(attention_mask[row, cursor:])
        ids = torch.cat(pieces_ids)
        mask = torch.cat(pieces_mask)
        # Drop the row's old padding; re-padded below to the new common length.
        valid = mask.bool()
        rows_ids.append(ids[valid] if not bool(valid.all()) else ids)
        rows_mask.append(mask[valid] if not bool(valid.all()) else mask)

    side = _padding_side(attention_mask)
    length = max(r.shape[0] for r in rows_ids)
    pad_id = adapter.pad_token_id()
    new_ids = input_ids.new_full((len(rows_ids), length), pad_id)
    new_mask = attention_mask.new_zeros((len(rows_ids), length))
    for row, (ids, mask) in enumerate(zip(rows_ids, rows_mask)):
        n = ids.shape[0]
        if side == "left":
            new_ids[row, length - n :], new_mask[row, length - n :] = ids, mask
        else:
            new_ids[row, :n], new_mask[row, :n] = ids, mask
    return PrunedInputs(new_ids, new_mask, adapter.encoder_outputs(features))


def _pop_inputs(args: tuple, kwargs: dict[str, Any], adapter: VisionLanguageAdapter):
    """Separate input_ids / attention_mask / image inputs from a generate/forward call."""
    kwargs = dict(kwargs)
    args = list(args)
    input_ids = kwargs.pop("input_ids", None)
    if input_ids is None:
        input_ids = kwargs.pop("inputs", None)
    if input_ids is None and args and isinstance(args[0], torch.Tensor):
        input_ids = args.pop(0)
    image_inputs = {key: kwargs.pop(key) for key in adapter.image_input_keys if key in kwargs}
    for key in ("vision_feature_layer", "vision_feature_select_strategy", "image_sizes"):
        if key in kwargs:
            image_inputs[key] = kwargs.pop(key)
    return input_ids, kwargs.pop("attention_mask", None), image_inputs, tuple(args), kwargs


def install(handle: PatchHandle, adapter: VisionLanguageAdapter, method: VisualPruner) -> None:
    """Wrap ``model.generate`` and ``model.forward`` (instance attributes, undone by the handle)."""
    model = adapter.model
    original_generate = model.generate
    original_forward = model.forward
    inside_generate = {"depth": 0}

    def has_images(image_inputs: dict[str, Any]) -> bool:
        return any(image_inputs.get(k) is not None for k in adapter.image_input_keys)

    @functools.wraps(original_generate)
    def generate(*args: Any, **kwargs: Any) -> Any:
        input_ids, attention_mask, image_inputs, rest, other = _pop_inputs(args, kwargs, adapter)
        if not has_images(image_inputs):
            return original_generate(*args, **kwargs)
        if input_ids is None:
            raise ValueError("visual token pruning needs input_ids (the image placeholders locate each image)")
        with torch.no_grad():  # generate never differentiates; neither does its preparation
            pruned = prune_inputs(handle, adapter, method, input_ids, attention_mask, image_inputs)
        inside_generate["depth"] += 1
        try:
            out = original_generate(
                *rest, input_ids=pruned.input_ids, attention_mask=pruned.attention_mask, **pruned.encoder_kwargs, **other
            )
        finally:
            inside_generate["depth"] -= 1
        return _restore_prompt(out, input_ids, pruned.input_ids.shape[1])

    @functools.wraps(original_forward)
    def forward(*args: Any, **kwargs: Any) -> Any:
        if inside_generate["depth"]:
            return original_forward(*args, **kwargs)
        input_ids, attention_mask, image_inputs, rest, other = _pop_inputs(args, kwargs, adapter)
        past = other.get("past_key_values")
        prefill = past is None or past.get_seq_length() == 0
        if not has_images(image_inputs) or not prefill:
            return original_forward(*args, **kwargs)
        if input_ids is None:
            raise ValueError("visual token pruning needs input_ids (the image placeholders locate each image)")
        for key in ("position_ids", "labels"):
            if other.get(key) is not None:
                raise NotImplementedError(f"{key} cannot be combined with pre-LLM pruning: the sequence is shortened")
        pruned = prune_inputs(handle, adapter, method, input_ids, attention_mask, image_inputs)
        return original_forward(
            *rest, input_ids=pruned.input_ids, attention_mask=pruned.attention_mask, **pruned.encoder_kwargs, **other
        )

    handle.set_attr(model, "generate", generate)
    handle.set_attr(model, "forward", forward)


def _restore_prompt(out: Any, prompt_ids: torch.Tensor, pruned_len: int) -> Any:
    """Replace the pruned prompt at the head of generate's output by the caller's prompt."""

    def fix(sequences: torch.Tensor) -> torch.Tensor:
        prompt = prompt_ids.to(sequences.device)
        if sequences.shape[0] != prompt.shape[0]:  # num_return_sequences > 1
            prompt = prompt.repeat_interleave(sequences.shape[0] // prompt.shape[0], dim=0)
        return torch.cat([prompt, sequences[:, pruned_len:]], dim=1)

    if isinstance(out, torch.Tensor):
        return fix(out)
    if hasattr(out, "sequences"):
        out.sequences = fix(out.sequences)
    return out
