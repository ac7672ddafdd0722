"""Pre-LLM visual pruning in Hugging Face models (DivPrune, HoloV, VisionZip, ...).

The method picks which visual tokens of each image reach the decoder *before* anything is
decoded, so the prompt itself gets shorter: ``generate`` (and a direct forward pass) are wrapped to

1. encode the images once (vision tower + projector, through the adapter),
2. let the method select (and possibly merge) each image's tokens (a method that ``requires``
   ``"instruction"`` also gets the text of the image's row, see
   :meth:`VisionLanguageAdapter.instruction_embeddings`),
3. rewrite ``input_ids``/``attention_mask`` so each image keeps exactly as many placeholder
   tokens as the method kept (rows re-padded on the side they were padded on),
4. hand the selected embeddings to the model as pre-computed encoder outputs.

The decoder and its KV cache therefore only ever see the kept tokens. Positions are the adapter's
choice (:meth:`VisionLanguageAdapter.pruned_kwargs`): LLaVA-1.5/NeXT re-index (the decoder sees a
shorter, contiguous prompt, as DivPrune/VisionZip do in their public code); Qwen2-VL/Qwen2.5-VL keep
each kept token's original 3-D M-RoPE position. Adapters may also lay an image's kept tokens out
with extra structural slots (LLaVA-NeXT's row newlines, :meth:`VisionLanguageAdapter.layout`).
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
    encoder_kwargs: dict[str, Any]  # encoder outputs, token-aligned tensors, positions


def _padding_side(attention_mask: torch.Tensor) -> str:
    """'right' only when some row is padded at the end and none at the start."""
    if attention_mask.shape[1] == 0:
        return "left"
    left = bool((attention_mask[:, 0] == 0).any())
    right = bool((attention_mask[:, -1] == 0).any())
    return "right" if right and not left else "left"


def assign_images_to_runs(adapter: VisionLanguageAdapter, input_ids: torch.Tensor, images: list[ImageTokens]):
    """Map images (in batch order) to their placeholder blocks: ``[(row, start, end, image_idx)]``.

    Adjacent images without a separator form one placeholder run; it is split by image block size.
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
                n = adapter.block_size(images[next_image])
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
    aligned: Optional[dict[str, torch.Tensor]] = None,
) -> PrunedInputs:
    """Encode, select and rewrite one batch (steps 1-4 of the module docstring).

    ``aligned`` holds keyword arguments shaped like ``input_ids`` (``mm_token_type_ids``...): they
    are gathered like ``input_ids`` and returned in ``encoder_kwargs``.
    """
    aligned = aligned or {}
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    images = adapter.encode_images(image_inputs, method.requires)
    placements = assign_images_to_runs(adapter, input_ids, images)
    if "instruction" in method.requires:
        # Each image is pruned for the instruction of the row it sits in.
        instructions = adapter.instruction_embeddings(input_ids, attention_mask)
        for row, _, _, image_idx in placements:
            image = images[image_idx]
            image.extras = {**(image.extras or {}), "instruction": instructions[row]}
    kept = method.select_batch(images)
    slots = [adapter.layout(image, idx, method.merge(image, idx)) for image, idx in zip(images, kept)]

    call = handle.stats.new_call()
    by_row: dict[int, list[tuple[int, int, int]]] = {}
    for row, start, end, image_idx in placements:
        by_row.setdefault(row, []).append((start, end, image_idx))
    device = input_ids.device
    rows_index = []
    for row in range(input_ids.shape[0]):
        pieces, cursor = [], 0
        for slot, (start, end, image_idx) in enumerate(by_row.get(row, [])):
            offsets = slots[image_idx][0].to(device)
            pieces += [torch.arange(cursor, start, device=device), start + offsets]
            cursor = end
            handle.stats.add(call=call, row=row, image=slot, before=end - start, after=int(offsets.numel()),
                             kept=tuple(kept[image_idx].tolist()))
        pieces.append(torch.arange(cursor, input_ids.shape[1], device=device))
        index = torch.cat(pieces)
        # Drop the row's old padding; re-padded below to the new common length.
        rows_index.append(index[attention_mask[row, index].bool()])

    side = _padding_side(attention_mask)
    length = max(r.shape[0] for r in rows_index)
    index = torch.full((len(rows_index), length), -1, dtype=torch.long, device=device)
    for row, idx in enumerate(rows_index):
        n = idx.shape[0]
        if side == "left":
            index[row, length - n :] = idx
        else:
            index[row, :n] = idx
    valid = index >= 0
    safe = index.clamp_min(0)
    new_ids = torch.gather(input_ids, 1, safe).masked_fill(~valid, adapter.pad_token_id())
    new_mask = valid.to(attention_mask.dtype)
    extra = {key: torch.gather(value, 1, safe.to(value.device)).masked_fill(~valid.to(value.device), 0)
             for key, value in aligned.items()}
    full_inputs = {"input_ids": input_ids, "attention_mask": attention_mask, **image_inputs, **aligned}
    extra.update(adapter.pruned_kwargs(full_inputs, index, new_mask))
    extra.update(adapter.encoder_outputs([features for _, features in slots]))
    return PrunedInputs(new_ids, new_mask, extra)


def _pop_inputs(args: tuple, kwargs: dict[str, Any], adapter: VisionLanguageAdapter):
    """Separate input_ids / attention_mask / image inputs / token-aligned inputs from a call."""
    kwargs = dict(kwargs)
    args = list(args)
    input_ids = kwargs.pop("input_ids", None)
    if input_ids is None:
        input_ids = kwargs.pop("inputs", None)
    if input_ids is None and args and isinstance(args[0], torch.Tensor):
        input_ids = args.pop(0)
    image_inputs = {key: kwargs.pop(key) for key in adapter.image_input_keys if key in kwargs}
    for key in adapter.image_option_keys:
        if key in kwargs:
            image_inputs[key] = kwargs.pop(key)
    aligned = {key: kwargs.pop(key) for key in adapter.token_aligned_keys if kwargs.get(key) is not None}
    return input_ids, kwargs.pop("attention_mask", None), image_inputs, aligned, tuple(args), kwargs


def _check_supported(adapter: VisionLanguageAdapter, other: dict[str, Any]) -> None:
    for key in adapter.unsupported_keys:
        if other.get(key) is not None:
            raise NotImplementedError(
                f"{key} cannot be combined with pre-LLM visual pruning on {type(adapter.model).__name__} yet"
            )


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
        input_ids, attention_mask, image_inputs, aligned, rest, other = _pop_inputs(args, kwargs, adapter)
        if not has_images(image_inputs):
            return original_generate(*args, **kwargs)
        if input_ids is None:
            raise ValueError("visual token pruning needs input_ids (the image placeholders locate each image)")
        _check_supported(adapter, other)
        if other.get("position_ids") is not None:
            raise NotImplementedError("position_ids cannot be combined with pre-LLM pruning: the sequence is shortened")
        with torch.no_grad():  # generate never differentiates; neither does its preparation
            pruned = prune_inputs(handle, adapter, method, input_ids, attention_mask, image_inputs, aligned)
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
        input_ids, attention_mask, image_inputs, aligned, rest, other = _pop_inputs(args, kwargs, adapter)
        past = other.get("past_key_values")
        prefill = past is None or past.get_seq_length() == 0
        if not has_images(image_inputs) or not prefill:
            return original_forward(*args, **kwargs)
        if input_ids is None:
            raise ValueError("visual token pruning needs input_ids (the image placeholders locate each image)")
        for key in ("position_ids", "labels"):
            if other.get(key) is not None:
                raise NotImplementedError(f"{key} cannot be combined with pre-LLM pruning: the sequence is shortened")
        _check_supported(adapter, other)
        pruned = prune_inputs(handle, adapter, method, input_ids, attention_mask, image_inputs, aligned)
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
