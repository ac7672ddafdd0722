"""What every pruned vLLM model shares: the kept count per image and the row selection.

vLLM sizes each image's placeholder run in the front-end processor, before anything is scheduled,
and scatters the encoder's rows into those slots in the worker. Pruning therefore splits in two, as
vLLM's own EVS video pruning does:

* **count** (front end): a processor mixed with :class:`PruningProcessor` computes ``K`` per image
  from the image's size and the request's budget (``mm_processor_kwargs={"tokenprune_keep": k}``)
  and adds it to the processed inputs as the per-image field ``tokenprune_num_kept``; the model's
  placeholder run is sized from that same field, so the two sides cannot disagree.
  ``mm_processor_kwargs`` are part of vLLM's multimodal hash, so processor, encoder and prefix
  caches never mix budgets;
* **which rows** (worker): the model encodes the image as usual and :func:`select_rows` picks ``K``
  rows by content with the method, checking the count itself (vLLM silently truncates when it gets
  more rows than placeholders, and fails on fewer).

Nothing here knows a model: ``llava.py``, ``llava_next.py`` and ``qwen.py`` say where an image's
tokens are and what a kept token's position is.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Optional

import torch
from transformers import BatchFeature
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems

from tokenprune.integrations.vllm.checks import check_engine, check_method
from tokenprune.integrations.vllm.config import (
    ENV_VAR,
    HF_CONFIG_KEY,
    REQUEST_KEEP_KEY,
    config_source,
    method_from_hf_config,
    request_keep,
)
from tokenprune.methods.base import ImageTokens, VisualPruner
from tokenprune.stats import PruneStats

__all__ = [
    "NUM_KEPT_FIELD",
    "configured_method",
    "PruningProcessingInfo",
    "PruningProcessor",
    "kept_field",
    "kept_counts",
    "select_rows",
    "record_stats",
]

#: per-image field (int64 ``[num_images]``) carrying the kept-token count from processor to model.
NUM_KEPT_FIELD = "tokenprune_num_kept"


def configured_method(
    hf_config: Any, architecture: str, provided: frozenset[str], vllm_config: Any = None
) -> VisualPruner:
    """The method configured for one engine (``hf_overrides`` or the environment), checked against
    the inputs this architecture's vLLM integration computes (``provided``), the platform
    (:func:`~tokenprune.integrations.vllm.checks.check_method`) and, given ``vllm_config`` (the
    model is being built), the engine's options (:func:`~tokenprune.integrations.vllm.checks.check_engine`).

    Raises:
        ValueError: nothing configured, a method ``requires`` something not in ``provided``, or an
            option this platform or engine cannot run (the message names the key).
    """
    method = method_from_hf_config(hf_config)
    if method is None:
        raise ValueError(
            f"tokenprune: the pruned {architecture} architecture is selected but no method is configured; set "
            f"{ENV_VAR}='{{\"method\": \"divprune\", \"keep\": 64}}' or "
            f"hf_overrides={{{HF_CONFIG_KEY!r}: {{\"method\": \"divprune\", \"keep\": 64}}}}"
        )
    missing = set(method.requires) - provided
    if missing:
        raise ValueError(
            f"tokenprune: {type(method).__name__} needs {', '.join(sorted(missing))}, which tokenprune's vLLM "
            f"integration does not compute for {architecture} (it provides: {', '.join(sorted(provided))}); "
            "choose a method without it, e.g. divprune"
        )
    check_method(method, config_source(hf_config))
    if vllm_config is not None:
        check_engine(method, vllm_config, architecture)
    return method


# --------------------------------------------------------------------------- front end


class PruningProcessingInfo:
    """Mixin for a vLLM ``BaseProcessingInfo``: the configured method and per-request budgets.

    ``get_num_image_tokens`` keeps returning the unpruned count, and so does the per-item maximum
    vLLM sizes its encoder cache and input validation with: a request may ask for any budget.
    """

    #: architecture name used in messages.
    tokenprune_architecture: ClassVar[str] = ""
    #: ``ImageTokens`` inputs this architecture's model computes for methods that ``require`` them.
    tokenprune_provides: ClassVar[frozenset[str]] = frozenset()

    def tokenprune_method(self) -> VisualPruner:
        if not hasattr(self, "_tokenprune_method"):
            self._tokenprune_method = configured_method(
                self.get_hf_config(), self.tokenprune_architecture, self.tokenprune_provides
            )
        return self._tokenprune_method

    def tokenprune_kept(self, n: int, mm_kwargs: Mapping[str, object]) -> int:
        """Kept tokens of an image of ``n`` tokens under the budget of the request's ``mm_kwargs``."""
        merged = self.ctx.get_merged_mm_kwargs(mm_kwargs)
        return request_keep(self.tokenprune_method(), merged).num_kept(n)


class PruningProcessor:
    """Mixin for a vLLM ``BaseMultiModalProcessor``: adds ``tokenprune_num_kept`` per image.

    Subclasses write :meth:`tokenprune_counts` (one ``K`` per processed image) and size their
    placeholder runs with :func:`kept_field`.
    """

    def tokenprune_counts(self, processed: BatchFeature, mm_kwargs: Mapping[str, object]) -> Optional[list[int]]:
        """``K`` of every image in ``processed`` (``None``: no pixel inputs, nothing to prune)."""
        raise NotImplementedError

    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> BatchFeature:
        # The per-request budget is ours; transformers would warn about it on every request.
        hf_kwargs = {k: v for k, v in hf_kwargs.items() if k != REQUEST_KEEP_KEY}
        return super()._call_hf_processor(hf_data, hf_kwargs)  # type: ignore[misc]

    def _postprocess_hf_mm_data(
        self,
        mm_inputs: Mapping[str, object],
        hf_processor_mm_kwargs: Mapping[str, object],
        processed_data: BatchFeature,
    ) -> BatchFeature:
        processed = super()._postprocess_hf_mm_data(mm_inputs, hf_processor_mm_kwargs, processed_data)  # type: ignore[misc]
        counts = self.tokenprune_counts(processed, hf_processor_mm_kwargs)
        if counts is not None:
            processed[NUM_KEPT_FIELD] = torch.tensor(counts, dtype=torch.long)
        return processed

    def _get_mm_fields_config(
        self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]
    ) -> Mapping[str, MultiModalFieldConfig]:
        fields = dict(super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs))  # type: ignore[misc]
        fields[NUM_KEPT_FIELD] = MultiModalFieldConfig.batched("image", keep_on_cpu=True)
        return fields


def kept_field(out_mm_kwargs: MultiModalKwargsItems, item_idx: int) -> Optional[int]:
    """``K`` of image ``item_idx`` from the processed inputs, ``None`` for precomputed embeddings
    (the caller chose the rows; nothing is pruned)."""
    items = out_mm_kwargs.get("image", [])
    item = items[item_idx] if item_idx < len(items) else None
    if item is None or NUM_KEPT_FIELD not in item:
        return None
    return int(item[NUM_KEPT_FIELD].data)


# --------------------------------------------------------------------------- worker


def kept_counts(num_kept: object, num_images: int) -> list[int]:
    """The ``tokenprune_num_kept`` field of one encoder batch as a list, one count per image."""
    counts = [int(c) for c in torch.as_tensor(num_kept).flatten().tolist()]
    if len(counts) != num_images:
        raise RuntimeError(
            f"tokenprune: {num_images} image(s) were encoded but {len(counts)} kept-token counts "
            "arrived from the processor"
        )
    return counts


def select_rows(
    method: VisualPruner,
    images: Sequence[ImageTokens],
    counts: Sequence[int],
    rows_of: Optional[Sequence[ImageTokens]] = None,
) -> list[tuple[Optional[torch.Tensor], torch.Tensor]]:
    """Keep ``counts[i]`` tokens of image ``i``: ``(kept, rows)`` per image.

    ``kept`` are the kept indices (ascending, ``None`` when the budget covers every token and the
    image passes through untouched, so keep-all reproduces the unpatched engine exactly); ``rows``
    ``[counts[i], D]`` the embeddings that fill the placeholders (``method.merge``: the kept rows, or
    merged ones for merging methods). Images are grouped by budget and each group goes to
    ``select_batch`` at once (one packed ``mmdp_select`` launch for DivPrune). ``rows_of`` are the
    images whose rows are merged, when they are wider than what the method selects on (Qwen3-VL's
    rows carry DeepStack features after the embedding).

    Raises:
        RuntimeError: a count out of range (processor and model disagree) or a method returning a
            different number of rows than placeholders.
    """
    out: list[Optional[tuple[Optional[torch.Tensor], torch.Tensor]]] = [None] * len(images)
    groups: dict[int, list[int]] = defaultdict(list)
    for i, (image, k) in enumerate(zip(images, counts)):
        if not 1 <= k <= image.num_tokens:
            raise RuntimeError(
                f"tokenprune: image {i} has {image.num_tokens} tokens but {k} placeholders; "
                "the processor and the model disagree"
            )
        if k == image.num_tokens:
            out[i] = (None, (rows_of or images)[i].features)
        else:
            groups[k].append(i)
    for k, members in groups.items():
        budget = dataclasses.replace(method, keep=k)
        kept = budget.select_batch([images[i] for i in members])
        for i, idx in zip(members, kept):
            idx = idx.to(images[i].features.device)
            rows = budget.merge((rows_of or images)[i], idx)
            if rows.shape[0] != k or idx.shape[0] != k:
                # vLLM would silently truncate extra rows (and fail on missing ones).
                raise RuntimeError(
                    f"tokenprune: {type(method).__name__} returned {rows.shape[0]} rows for image {i}, "
                    f"which has exactly {k} placeholder tokens"
                )
            out[i] = (idx, rows)
    return out  # type: ignore[return-value]


def record_stats(
    stats: PruneStats,
    images: Sequence[ImageTokens],
    chosen: Sequence[tuple[Optional[torch.Tensor], torch.Tensor]],
    before: Optional[Sequence[int]] = None,
    after: Optional[Sequence[int]] = None,
) -> None:
    """Replace ``stats`` by one encoder call's records: per image the placeholders before and after
    pruning (default: the image's tokens and the kept rows) and the kept token indices. A server
    runs for ever: only the last call is kept."""
    stats.records.clear()
    call = stats.new_call()
    for i, (image, (kept, rows)) in enumerate(zip(images, chosen)):
        indices = tuple(range(image.num_tokens)) if kept is None else tuple(kept.tolist())
        stats.add(call=call, row=0, image=i, kept=indices,
                  before=int(before[i]) if before is not None else image.num_tokens,
                  after=int(after[i]) if after is not None else int(rows.shape[0]))
