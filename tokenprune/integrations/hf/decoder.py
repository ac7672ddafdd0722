"""One runtime for every method that acts inside a Hugging Face decoder.

Methods are *policies* (``tokenprune.methods.base``): a :class:`~tokenprune.methods.base.SequencePruner`
(stage ``"llm"``: FastV; stage ``"prompt"``: LazyLLM) scores the tokens entering a scheduled layer, a
:class:`~tokenprune.methods.base.KVPruner` (stage ``"kv"``: SnapKV, Knorm) scores each layer's
cached prompt entries after prefill. One sequence policy and one KV policy may run together. This
runtime owns everything else:

* **pass detection**: a forward pre-hook on the model's inner module (``model.model``, which
  receives the final ``input_ids`` — after any pre-LLM pruning — and the cache) tells prefill (empty
  cache) from decoding steps and records the prompt's padding, positions and image runs;
* **capture** of the queries, keys and rotary embeddings of the layers that score (forward hooks on
  ``q_proj``/``k_proj``, a pre-hook on the attention), so scores come from
  :func:`tokenprune.kernels.attention_topk` and every layer keeps its SDPA/flash attention;
* **layer wrapping** (instance-level ``forward`` overrides recorded on the patch handle) of the layers
  that run on fewer tokens, with their **masks** (eager / SDPA / flash formats), **gathers** of hidden
  states and positions, KV-cache **compression**, and **statistics**;
* beam search: the per-row state follows the cache when generate reorders beams.

**Sequence policies.** The runtime tracks, per decoder layer ``i >= first scheduled layer``, the
*slots* of its KV cache: which sequence index each slot holds and whether it is valid (fillers and
padding are not). Before each scheduled layer ``l`` the policy scores the tokens alive at ``l - 1``
(``DecoderView.attention``); the best ones per group (each image for ``tokens="image"``, the row's
prompt for ``tokens="prompt"``, plus the policy's ``protected`` tokens) continue and their hidden
states are gathered, so the KV of dropped tokens is never computed at deeper layers. Rows that keep
fewer tokens than the longest row are padded with masked *filler* slots, so rows stay independent.
Kept tokens keep their original positions (their RoPE never changes). Decoding steps run on the
pruned caches.

With ``policy.revives`` (LazyLLM's dynamic pruning) the selection is repeated at every decoding step
with the new token as the scorer. A dropped token's layer-``l`` input is kept in an auxiliary cache;
when a later step selects it again it is *revived*: computed at layers ``l, l+1, ...`` together with
the new token (as extra query rows before it, attending causally to the visible keys) until a
scheduled layer drops it again. Each token is computed at most once per layer. Prompt tokens not
selected at a step are masked out of that step's attention at deeper layers.

**KV policies.** After each layer's prefill its cache is compressed per KV head to the policy's top
entries plus the last ``window`` prompt slots. Rows of a padded batch keep the same number of slots;
a row that keeps fewer valid entries keeps some masked filler slots, identical for every head, so one
mask per layer still describes the cache. Layers that do not run on slots of their own get the
model-level 2-D attention mask rewritten to the compressed layout at decoding steps.

If nothing is pruned, every layer runs untouched: the output is the unpatched model's bit for bit.

Limitations: left padding only; a generation must start from an empty cache (the prefill is where
pruning happens); dynamic revival and KV compression need eager or SDPA attention; no
sliding-window attention beyond the window.
"""

from __future__ import annotations

import dataclasses
import functools
import weakref
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from tokenprune.integrations.hf.adapters import ModelAdapter
from tokenprune.kernels import attention_topk
from tokenprune.methods.base import KVPruner, Pruner, SequencePruner, topk_ascending
from tokenprune.patching import PatchHandle

FLASH = ("flash_attention_2", "flash_attention_3")


# --------------------------------------------------------------------------- tensor helpers


def gather_seq(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``t[b, index[b]]`` along dim 1 for ``t`` ``[B or 1, L, ...]`` and ``index`` ``[B, L']``."""
    t = t.expand(index.shape[0], *t.shape[1:])
    idx = index.view(*index.shape, *([1] * (t.dim() - 2))).expand(*index.shape, *t.shape[2:])
    return torch.gather(t, 1, idx)


def build_mask(impl: str, q_index: torch.Tensor, k_index: torch.Tensor, k_visible: torch.Tensor,
               dtype: torch.dtype) -> torch.Tensor:
    """Attention mask for queries that are the last ``q`` key slots, in ``impl``'s format.

    ``q_index`` ``[B, q]`` / ``k_index`` ``[B, kv]`` are sequence indices (causality is by index,
    which orders tokens as their original positions do); ``k_visible`` ``[B, kv]`` hides fillers,
    padding and pruned tokens. A query that would see nothing (a filler) sees its own slot. Flash
    attention takes a 2-D key mask (causal by slot order, so slots must be in sequence order).
    """
    if impl in FLASH:
        return k_visible.to(torch.long)
    q, kv = q_index.shape[1], k_index.shape[1]
    allowed = (k_index[:, None, :] <= q_index[:, :, None]) & k_visible[:, None, :]
    rows = torch.arange(q, device=allowed.device)
    allowed[:, rows, rows + (kv - q)] = True
    allowed = allowed[:, None]
    if impl == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


def rank_keep(scores: torch.Tensor, candidate: torch.Tensor, forced: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Keep mask (shape of ``scores``, ``[..., n]``): the ``k`` (``[...]``) best candidates by score,
    forced ones first (latest first among them), ties to the lowest index."""
    n = scores.shape[-1]
    position = torch.arange(n, device=scores.device, dtype=torch.float32) / max(n, 1)
    key = torch.where(candidate, scores.float(), torch.full_like(scores, float("-inf"), dtype=torch.float32))
    key = torch.where(forced & candidate, 2.0 + position, key)
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(n, device=order.device).expand_as(order))
    return candidate & (rank < k.unsqueeze(-1))


def pack(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Columns of ``mask`` ``[B, n]`` that are True, per row, ascending, right-aligned in ``[B, m]``
    (``m`` = the largest row count); earlier columns are padded with False ones. Returns
    ``(columns [B, m], valid [B, m])``."""
    n = mask.shape[1]
    m = int(mask.sum(dim=1).max()) if mask.numel() else 0
    arange = torch.arange(n, device=mask.device)
    key = torch.where(mask, arange + n, arange)
    cols = torch.sort(key, dim=1).indices[:, n - m:]
    return cols, torch.gather(mask, 1, cols)


def _valid_prompt(attention_mask: Optional[torch.Tensor], b: int, length: int, device) -> torch.Tensor:
    if attention_mask is None or attention_mask.dim() != 2:
        return torch.ones(b, length, dtype=torch.bool, device=device)
    valid = attention_mask[:, -length:].bool()
    if bool((~valid[:, -1]).any()):
        raise ValueError("pruning inside the decoder needs left padding (or none): the last prompt token of "
                         "every row must be real")
    return valid


def _check_window(adapter: ModelAdapter, length: int) -> None:
    cfg = adapter.text_model().config
    window = getattr(cfg, "sliding_window", None)
    if window is not None and "sliding_attention" in (getattr(cfg, "layer_types", None) or ["sliding_attention"]):
        if length > window:
            raise NotImplementedError(
                f"pruning inside the decoder does not support sliding-window attention beyond the window "
                f"({window} tokens); the prompt has {length}"
            )


def _select_rows(value: Any, rows: torch.Tensor, batch: int) -> Any:
    """``value`` with every per-row tensor (leading dim ``batch``) indexed by ``rows``, recursively."""
    if isinstance(value, torch.Tensor):
        return value.index_select(0, rows.to(value.device)) if value.dim() and value.shape[0] == batch else value
    if isinstance(value, dict):
        return {k: _select_rows(v, rows, batch) for k, v in value.items()}
    if isinstance(value, list) and len(value) == batch:  # per-row Python lists (image starts)
        return [value[i] for i in rows.tolist()]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{f.name: _select_rows(getattr(value, f.name), rows, batch)
                                            for f in dataclasses.fields(value)})
    return value


# --------------------------------------------------------------------------- state


@dataclass
class _Slots:
    """KV-cache slots of one layer: sequence index and validity, ``[B, n]`` each."""

    index: torch.Tensor
    valid: torch.Tensor

    def append(self, index: torch.Tensor, valid: torch.Tensor) -> "_Slots":
        return _Slots(torch.cat([self.index, index], 1), torch.cat([self.valid, valid], 1))


@dataclass
class _Aux:
    """Aux cache of one scheduled layer ``l``: input hidden states of tokens dropped at ``l``."""

    hidden: torch.Tensor  # [B, m, D]
    lookup: torch.Tensor  # [B, L + 1] row of each prompt index in ``hidden`` (-1: absent; column L: dummy)


@dataclass
class _State:
    """What the runtime knows about the current generation; reset at every prefill."""

    batch: int = 0
    length: int = 0  # L, padded prompt length
    prefill: bool = False
    call: int = 0
    active: bool = False  # the sequence policy dropped something: wrapped layers run on slots
    valid: Optional[torch.Tensor] = None  # [B, L] real prompt tokens
    n_valid: Optional[torch.Tensor] = None  # [B]
    positions: Optional[torch.Tensor] = None  # [B, L] RoPE positions of the prompt (revival)
    groups: Optional[torch.Tensor] = None  # [B, L + 1] image number of each prompt index (-1: text, padding)
    image_starts: list[list[int]] = field(default_factory=list)  # per row, first index of each image
    depth: Optional[torch.Tensor] = None  # [B, L + 1] layers each prompt token is computed at (revival)
    visible: Optional[torch.Tensor] = None  # [B, L + 1] prompt tokens visible at this step (col L: generated)
    slots: dict[int, _Slots] = field(default_factory=dict)
    aux: dict[int, _Aux] = field(default_factory=dict)
    cur: Optional[_Slots] = None  # the rows flowing through the layers now
    next_index: int = 0  # sequence index of the next new token
    q_len: int = 0  # new tokens in this decoding pass
    captured: dict[int, dict[str, Any]] = field(default_factory=dict)
    keep_counts: dict[int, torch.Tensor] = field(default_factory=dict)  # per scheduled layer, [B]
    kv_slot_valid: Optional[torch.Tensor] = None  # [B, kept] compressed layout of the unwrapped layers
    kw_key: Any = None  # prefill kwargs transformed for the current ``cur`` (keyed by identities)
    kw_value: Any = None


# --------------------------------------------------------------------------- policy views


def _names(policies: list[Pruner]) -> str:
    return " + ".join(type(m).__name__ for m in policies)


def check_generate_options(policies: list[Pruner], kwargs: dict[str, Any], default_config: Any = None) -> None:
    """Refuse, before any work, the ``generate`` options a decoder policy cannot follow:

    * ``use_cache=False``: the policies prune the prompt once and keep pruned KV entries; without a
      cache every step would be a new prefill (LazyLLM would prune generated tokens, KV policies
      nothing).
    * a ``past_key_values`` that already holds tokens (continuing a conversation): its entries were
      pruned or not by an earlier call; the runtime starts from an empty cache.
    * a ``cache_implementation`` other than the dynamic cache: layers of different lengths need it.
    * assisted decoding (``assistant_model``, ``prompt_lookup_num_tokens``, ...): its first pass holds
      the prompt plus candidate tokens, which would be pruned as prompt, and it crops the cache.

    ``kwargs`` are generate's keyword arguments; options may also come from the ``generation_config``
    argument or the model's ``default_config``.
    """
    config = kwargs.get("generation_config") or default_config

    def option(name: str) -> Any:
        value = kwargs.get(name)
        return getattr(config, name, None) if value is None else value

    who = _names(policies)
    if option("use_cache") is False:
        raise ValueError(f"{who} prunes the prompt once and keeps a pruned KV cache: generate needs use_cache=True "
                         "(the default), got use_cache=False")
    past = kwargs.get("past_key_values")
    if past is not None and hasattr(past, "get_seq_length") and past.get_seq_length() > 0:
        raise ValueError(f"{who} needs generate to start from an empty cache; past_key_values already holds "
                         f"{past.get_seq_length()} tokens (continue a conversation by passing the whole "
                         "conversation as the prompt)")
    if past is not None:
        _check_cache(past, policies)
    cache = option("cache_implementation")
    if cache not in (None, "dynamic"):
        raise NotImplementedError(f"{who} needs the dynamic KV cache (its layers hold different numbers of "
                                  f"tokens), got cache_implementation={cache!r}")
    for name in ("assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit"):
        if option(name) is not None:
            raise NotImplementedError(f"{who} cannot run under assisted decoding: its first pass would prune the "
                                      f"candidate tokens as prompt; got {name}={option(name)!r} "
                                      "(for pruned speculative decoding see tp.DraftTree)")


def _check_cache(past: Any, policies: list[Pruner]) -> None:
    from transformers import DynamicCache

    if not isinstance(past, DynamicCache):
        raise NotImplementedError(f"{_names(policies)} needs a transformers DynamicCache (its layers hold "
                                  f"different numbers of tokens), got {type(past).__name__}")


def true_runs(mask: torch.Tensor) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` of the runs of True in a 1-D bool ``mask``."""
    if not bool(mask.any()):
        return []
    edges = torch.diff(torch.nn.functional.pad(mask.to(torch.int8), (1, 1)))
    return list(zip(torch.nonzero(edges == 1).flatten().tolist(), torch.nonzero(edges == -1).flatten().tolist()))


class _SequenceView:
    """:class:`~tokenprune.methods.base.DecoderView` of the tokens entering ``layer``."""

    def __init__(self, runtime: "DecoderRuntime", layer: int, index: torch.Tensor, valid: torch.Tensor,
                 keys: torch.Tensor):
        self.runtime, self.layer, self.index, self.valid, self._keys = runtime, layer, index, valid, keys

    @property
    def groups(self) -> torch.Tensor:
        st = self.runtime.state
        if st.groups is None:
            return torch.full_like(self.index, -1)
        return torch.gather(st.groups, 1, self.index.clamp(max=st.length))

    def attention(self, queries: str = "last", impl: str = "auto") -> torch.Tensor:
        rt = self.runtime
        if queries == "last":
            attn = rt.adapter.decoder_layers[self.layer - 1].self_attn
            q = rt.queries(self.layer - 1, None)
            _, scores = attention_topk(q[:, :, -1:], self._keys, 1, causal=rt.state.prefill, scale=attn.scaling,
                                       key_padding_mask=self.valid, impl=impl)
            return scores
        if queries != "text_mean" or not rt.state.prefill:
            raise ValueError(f"queries must be 'last' or (at prefill) 'text_mean', got {queries!r}")
        # The text after each row's last image (the instruction); the last token if the prompt ends
        # with an image. Rows without images score nothing.
        text = torch.zeros_like(self.valid)
        for row, starts in enumerate(rt.state.image_starts):
            if not starts:
                continue
            last_image = int(rt.state.groups[row, : rt.state.length].eq(len(starts) - 1).nonzero().max())
            text[row] = self.valid[row] & (self.index[row] > last_image)
            if not bool(text[row].any()):
                text[row, -1] = True
        return self.attention_from(text, impl=impl)

    def attention_from(self, queries: torch.Tensor, impl: str = "auto") -> torch.Tensor:
        rt = self.runtime
        if not rt.state.prefill:
            raise ValueError("attention_from is available at prefill only")
        if queries.shape != self.index.shape or queries.dtype != torch.bool:
            raise ValueError(f"queries must be a bool mask of shape {tuple(self.index.shape)}, "
                             f"got {queries.dtype} {tuple(queries.shape)}")
        attn = rt.adapter.decoder_layers[self.layer - 1].self_attn
        q = rt.queries(self.layer - 1, None)
        if q.shape[2] != self.index.shape[1]:
            raise RuntimeError(f"{type(rt.sequence).__name__} reads every query row: its query_rows must be None")
        scores = torch.zeros(self.index.shape, device=self._keys.device)
        for row in range(self.index.shape[0]):
            # Slots are in sequence order at prefill, so a run of query slots ending at ``end`` sees
            # exactly the keys before ``end``: attention_topk's causal layout on a key prefix.
            parts = []
            for start, end in true_runs(queries[row]):
                _, part = attention_topk(q[row: row + 1, :, start:end], self._keys[row: row + 1, :, :end], 1,
                                         key_padding_mask=self.valid[row: row + 1, :end], scale=attn.scaling,
                                         impl=impl)
                parts.append((part[0], end - start))
            if len(parts) == 1:
                scores[row, : parts[0][0].shape[0]] = parts[0][0]
            elif parts:
                total = sum(count for _, count in parts)
                for part, count in parts:
                    scores[row, : part.shape[0]] += part * (count / total)
        return scores


class _KVView:
    """:class:`~tokenprune.methods.base.KVView` of one layer's cache after prefill."""

    def __init__(self, runtime: "DecoderRuntime", layer: int, keys: torch.Tensor, values: torch.Tensor,
                 valid: torch.Tensor):
        self.runtime, self.layer, self.keys, self.values, self.valid = runtime, layer, keys, values, valid
        self.scale = runtime.adapter.decoder_layers[layer].self_attn.scaling

    def queries(self, window: int) -> torch.Tensor:
        return self.runtime.queries(self.layer, window)


# --------------------------------------------------------------------------- runtime


class DecoderRuntime:
    """Hooks, state and rank-and-gather for one sequence policy and/or one KV policy on one model."""

    def __init__(self, handle: PatchHandle, adapter: ModelAdapter, sequence: Optional[SequencePruner],
                 kv: Optional[KVPruner]):
        self.handle, self.adapter, self.sequence, self.kv = handle, adapter, sequence, kv
        self.depth = adapter.num_layers
        self.schedule = dict(sequence.resolve_schedule(self.depth)) if sequence is not None else {}
        self.first = min(self.schedule) if self.schedule else self.depth
        self.revive = sequence is not None and sequence.revives
        self.impl = adapter.attn_implementation()
        self.rotary = adapter.text_model().rotary_emb if self.revive else None
        # Rows each scoring layer's q_proj output must keep: the last token, the window, or all.
        self.query_rows: dict[int, Optional[int]] = {}
        for layer in self.schedule:
            self.query_rows[layer - 1] = sequence.query_rows
        if kv is not None and kv.window:
            for layer in range(self.depth):
                rows = self.query_rows.get(layer, 0)
                self.query_rows[layer] = None if rows is None else max(rows, kv.window)
        self.state = _State()

    # ------------------------------------------------------------------ installation
    @property
    def policies(self) -> list[Pruner]:
        return [m for m in (self.sequence, self.kv) if m is not None]

    def install(self) -> None:
        handle, adapter = self.handle, self.adapter
        handle.runtime = self  # introspection (tests, benchmarks): slots, aux cache, depths
        generate = getattr(adapter.model, "generate", None)
        if generate is not None:
            handle.set_attr(adapter.model, "generate", self.checked_generate(generate))
        handle.add_hook(adapter.inner_model().register_forward_pre_hook(self.on_pass, with_kwargs=True))
        for layer in sorted(self.query_rows):
            attn = adapter.decoder_layers[layer].self_attn
            handle.add_hook(attn.register_forward_pre_hook(self.capture_rope(layer), with_kwargs=True))
            handle.add_hook(attn.q_proj.register_forward_hook(self.capture(layer, "q")))
            if layer + 1 in self.schedule:
                handle.add_hook(attn.k_proj.register_forward_hook(self.capture(layer, "k")))
        for index in range(self.first, self.depth):
            layer = adapter.decoder_layers[index]
            handle.set_attr(layer, "forward", self.wrap_layer(layer, index))
        if self.kv is not None:
            for index, layer in enumerate(adapter.decoder_layers):
                handle.add_hook(layer.register_forward_hook(self.compress(index), with_kwargs=True))

    def checked_generate(self, generate: Any) -> Any:
        """``generate`` that first refuses the options the runtime cannot follow (:func:`check_generate_options`)."""

        @functools.wraps(generate)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            check_generate_options(self.policies, kwargs, getattr(self.adapter.model, "generation_config", None))
            return generate(*args, **kwargs)

        return wrapper

    # ------------------------------------------------------------------ pass detection
    def on_pass(self, module: Any, args: tuple, kwargs: dict) -> Optional[tuple[tuple, dict]]:
        past = kwargs.get("past_key_values")
        ids = kwargs.get("input_ids", args[0] if args else None)
        ref = ids if ids is not None else kwargs.get("inputs_embeds")
        b, q = ref.shape[0], ref.shape[1]
        if past is not None:
            _check_cache(past, self.policies)
            self._follow_beam_reorder(past)
        if past is None or past.get_seq_length() == 0:
            self.start_prefill(ids, ref, kwargs)
            return None
        st = self.state
        st.prefill = False
        if st.valid is None:  # a cache filled before the patch: nothing of it was pruned
            return None
        _check_window(self.adapter, st.next_index + q)
        st.q_len = q
        index = torch.arange(st.next_index, st.next_index + q, device=ref.device).expand(b, q)
        st.cur = _Slots(index, torch.ones(b, q, dtype=torch.bool, device=ref.device))
        st.next_index += q
        if self.revive:
            st.visible = torch.cat([st.valid, st.valid.new_ones(b, 1)], 1)
        mask = kwargs.get("attention_mask")
        if st.kv_slot_valid is not None and mask is not None and mask.dim() == 2:
            kwargs = dict(kwargs)
            kwargs["attention_mask"] = torch.cat([st.kv_slot_valid.to(mask.dtype), mask[:, st.length:]], 1)
            return args, kwargs
        return None

    def start_prefill(self, ids: Optional[torch.Tensor], ref: torch.Tensor, kwargs: dict) -> None:
        b, length = ref.shape[0], ref.shape[1]
        _check_window(self.adapter, length)
        valid = _valid_prompt(kwargs.get("attention_mask"), b, length, ref.device)
        positions = kwargs.get("position_ids")
        if positions is None or positions.dim() != 2:
            positions = torch.arange(length, device=ref.device)[None]
        st = _State(batch=b, length=length, prefill=True, call=self.handle.stats.new_call(), valid=valid,
                    n_valid=valid.sum(1), positions=positions.expand(b, length), next_index=length)
        st.cur = _Slots(torch.arange(length, device=ref.device).expand(b, length), valid)
        if self.sequence is not None and self.sequence.tokens == "image":
            if ids is None:
                raise ValueError(f"{type(self.sequence).__name__} needs input_ids to locate the image tokens; "
                                 "inputs_embeds alone is not supported")
            st.groups = torch.full((b, length + 1), -1, dtype=torch.long, device=ref.device)
            for row in range(b):
                runs = self.adapter.image_runs(ids[row])
                st.image_starts.append([start for start, _ in runs])
                for image, (start, end) in enumerate(runs):
                    st.groups[row, start:end] = image
        if self.revive:
            depth = torch.where(valid, self.depth, 0)
            st.depth = torch.cat([depth, depth.new_zeros(b, 1)], 1)
        self.state = st
        if self.sequence is not None:
            for row in range(b):
                for layer in range(self.first):
                    self._record_layer(row, layer, int(st.n_valid[row]))

    def _follow_beam_reorder(self, cache: Any) -> None:
        """Make the cache's ``reorder_cache`` (beam search) reorder this runtime's per-row state too."""
        original = getattr(cache, "reorder_cache", None)
        if original is None or getattr(original, "__tokenprune_runtime__", None) is self:
            return
        runtime = weakref.ref(self)

        def reorder_cache(beam_idx: torch.Tensor) -> None:
            original(beam_idx)
            rt = runtime()
            if rt is not None and rt.handle.active and rt.state.valid is not None:
                rt.state = _select_rows(rt.state, beam_idx, rt.state.batch)

        reorder_cache.__tokenprune_runtime__ = self
        cache.reorder_cache = reorder_cache

    # ------------------------------------------------------------------ capture
    def capture_rope(self, layer: int):
        def hook(module: Any, args: tuple, kwargs: dict) -> None:
            self.state.captured.setdefault(layer, {})["rope"] = kwargs.get("position_embeddings")

        return hook

    def capture(self, layer: int, name: str):
        def hook(module: Any, inputs: tuple, output: torch.Tensor) -> None:
            st = self.state
            if name == "k" and not st.prefill:
                return
            rows = self.query_rows.get(layer) if name == "q" else None
            st.captured.setdefault(layer, {})[name] = output if rows is None else output[:, -rows:]

        return hook

    def queries(self, layer: int, rows: Optional[int]) -> torch.Tensor:
        """Post-RoPE queries ``[B, Hq, r, D]`` of the last ``rows`` (``None``: all captured) tokens of ``layer``."""
        attn = self.adapter.decoder_layers[layer].self_attn
        cap = self.state.captured[layer]
        q = cap["q"] if rows is None else cap["q"][:, -rows:]
        b, r = q.shape[0], q.shape[1]
        q = q.view(b, r, -1, attn.head_dim).transpose(1, 2)
        cos, sin = cap["rope"]
        return self.adapter.apply_rotary(attn)(q, q, cos[:, -r:], sin[:, -r:])[0]

    def _prefill_keys(self, layer: int) -> torch.Tensor:
        """Post-RoPE keys ``[B, Hk, n, D]`` of the tokens that ran through ``layer`` at prefill."""
        attn = self.adapter.decoder_layers[layer].self_attn
        cap = self.state.captured[layer]
        k = cap.pop("k")
        b, n = k.shape[0], k.shape[1]
        k = k.view(b, n, -1, attn.head_dim).transpose(1, 2)
        cos, sin = cap["rope"]
        return self.adapter.apply_rotary(attn)(k, k, cos, sin)[1]

    # ------------------------------------------------------------------ statistics
    def _record_layer(self, row: int, layer: int, after: int) -> None:
        st = self.state
        self.handle.stats.add(call=st.call, row=row, layer=layer, before=int(st.n_valid[row]), after=after,
                              kind=f"{self.sequence.stats_prefix}-prefill")

    # ------------------------------------------------------------------ sequence policy: prefill
    def _keep_counts(self, layer: int) -> torch.Tensor:
        """``[B]`` prompt tokens kept before ``layer`` (``tokens="prompt"``), set at prefill by :meth:`_select`."""
        return self.state.keep_counts[layer]

    def _budgets(self, view: _SequenceView, scores: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
        """The policy's per-group counts (:meth:`SequencePruner.budget`), checked."""
        policy = self.sequence
        counts = policy.budget(view, scores, self.schedule[view.layer], sizes)
        if not (isinstance(counts, torch.Tensor) and counts.shape == sizes.shape and not counts.is_floating_point()
                and bool((counts >= 0).all()) and bool((counts <= sizes.to(counts.device)).all())):
            raise RuntimeError(f"{type(policy).__name__}.budget must return integer counts of shape "
                               f"{tuple(sizes.shape)} in [0, sizes], got {counts!r}")
        return counts.to(sizes.device)

    def _select(self, view: _SequenceView, scores: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """Keep mask ``[B, n]`` over the view's slots: every non-candidate valid slot, plus per group
        the policy's budget of best candidates (its protected ones first)."""
        st, policy, layer = self.state, self.sequence, view.layer
        if policy.tokens == "prompt":
            st.keep_counts[layer] = self._budgets(view, scores, st.n_valid[:, None])[:, 0]
            forced = policy.protected(view.index, st.length)
            return rank_keep(scores, candidates, forced, st.keep_counts[layer])
        keep = view.valid & ~candidates  # text is always kept
        groups = view.groups
        original = st.groups[:, : st.length]
        n_groups = max((len(starts) for starts in st.image_starts), default=0)
        sizes = torch.stack([(original == g).sum(1) for g in range(n_groups)], 1) if n_groups else (
            torch.zeros(original.shape[0], 0, dtype=torch.long, device=original.device))
        counts = self._budgets(view, scores, sizes).tolist()
        for row, starts in enumerate(st.image_starts):
            for image, start in enumerate(starts):
                members = torch.nonzero(candidates[row] & (groups[row] == image)).flatten()
                chosen = members[topk_ascending(scores[row, members], counts[row][image])]
                keep[row, chosen] = True
                if st.prefill:
                    self.handle.stats.add(call=st.call, row=row, image=image, layer=layer, before=int(sizes[row, image]),
                                          after=int(chosen.numel()), kind=policy.stats_prefix,
                                          kept=tuple((view.index[row, chosen] - start).tolist()))
        return keep

    def prune_prefill(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        st = self.state
        cur = st.cur
        view = _SequenceView(self, layer, cur.index, cur.valid, self._prefill_keys(layer - 1))
        scores = self.sequence.score(view)
        candidates = cur.valid if self.sequence.tokens == "prompt" else cur.valid & (view.groups >= 0)
        kept = self._select(view, scores, candidates)
        dropped = cur.valid & ~kept
        if not (st.active or bool(dropped.any())):
            return hidden  # nothing dropped yet: this layer runs untouched (padding stays in place)
        st.active = True
        if self.revive:
            cols, _ = pack(dropped)
            self._store_aux(layer, gather_seq(hidden, cols), torch.gather(cur.index, 1, cols),
                            torch.gather(dropped, 1, cols))
            st.depth.scatter_(1, torch.where(dropped, cur.index, st.length), layer)
            st.depth[:, st.length] = 0
        cols, valid = pack(kept)
        st.cur = _Slots(torch.gather(cur.index, 1, cols), valid)
        return gather_seq(hidden, cols)

    def _store_aux(self, layer: int, hidden: torch.Tensor, index: torch.Tensor, valid: torch.Tensor) -> None:
        st = self.state
        b, length = st.valid.shape
        aux = st.aux.get(layer)
        if aux is None:
            aux = _Aux(hidden[:, :0], torch.full((b, length + 1), -1, dtype=torch.long, device=hidden.device))
        offset = aux.hidden.shape[1]
        rows = torch.arange(offset, offset + index.shape[1], device=index.device).expand_as(index)
        lookup = aux.lookup.clone()
        lookup.scatter_(1, torch.where(valid, index, length), rows)
        lookup[:, length] = -1
        st.aux[layer] = _Aux(torch.cat([aux.hidden, hidden], 1), lookup)

    def prefill_kwargs(self, kwargs: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
        st = self.state
        key = (id(kwargs.get("position_embeddings")), id(kwargs.get("attention_mask")), id(st.cur))
        if st.kw_key == key:
            return st.kw_value
        new = dict(kwargs)
        if kwargs.get("position_embeddings") is not None:
            cos, sin = kwargs["position_embeddings"]
            new["position_embeddings"] = (gather_seq(cos, st.cur.index), gather_seq(sin, st.cur.index))
        if kwargs.get("position_ids") is not None:
            new["position_ids"] = gather_seq(kwargs["position_ids"], st.cur.index)
        if self.impl != "eager" and bool(st.cur.valid.all()):
            # Slots are in sequence order and none is masked: plain causal attention (the fast path).
            new["attention_mask"] = None
        else:
            new["attention_mask"] = build_mask(self.impl, st.cur.index, st.cur.index, st.cur.valid, dtype)
        st.kw_key, st.kw_value = key, new
        return new

    # ------------------------------------------------------------------ sequence policy: decoding
    def decode_mask_kwargs(self, index: int, hidden: torch.Tensor, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Decoding step of a layer that runs on its own slots (no revival): mask the fillers."""
        st = self.state
        q_len = hidden.shape[1]
        kv_len = kwargs["past_key_values"].layers[index].get_seq_length() + q_len
        slot_valid = st.slots[index].valid
        key_valid = torch.cat([slot_valid, slot_valid.new_ones(slot_valid.shape[0], kv_len - slot_valid.shape[1])], 1)
        new = dict(kwargs)
        if self.impl != "eager" and bool(key_valid.all()):
            new["attention_mask"] = None
        else:
            positions = torch.arange(kv_len, device=key_valid.device).expand_as(key_valid)
            new["attention_mask"] = build_mask(self.impl, positions[:, kv_len - q_len:], positions, key_valid,
                                               hidden.dtype)
        return new

    def select_decode(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """Repeat the selection for the new token at scheduled ``layer``; revive from the aux cache."""
        st = self.state
        length = st.length
        prev = st.slots[layer - 1] if layer - 1 in st.slots else None
        cache = st.captured[layer - 1].pop("cache")
        keys = cache.layers[layer - 1].keys
        b = keys.shape[0]
        if prev is None:  # layer - 1 keeps every prompt token (it is before the first scheduled layer)
            prev_index = torch.arange(keys.shape[2], device=keys.device).expand(b, -1)
            prev = _Slots(prev_index, torch.cat([st.valid, st.valid.new_ones(b, keys.shape[2] - length)], 1))
        visible = prev.valid & torch.gather(st.visible, 1, prev.index.clamp(max=length))
        scores = self.sequence.score(_SequenceView(self, layer, prev.index, visible, keys))
        is_prompt = prev.index < length
        kept = rank_keep(scores, visible & is_prompt, self.sequence.protected(prev.index, length),
                         self._keep_counts(layer))
        selected = torch.zeros_like(st.visible)
        selected.scatter_(1, torch.where(kept, prev.index, length), True)
        selected[:, length] = True
        st.visible = selected

        # Revive: selected prompt tokens computed up to ``layer`` only (in flight or in the aux cache).
        revive = selected[:, :length] & (st.depth[:, :length] == layer)
        q = st.q_len
        flight = _Slots(st.cur.index[:, :-q], st.cur.valid[:, :-q])
        flight_hidden = hidden[:, :-q]
        if flight.index.shape[1]:
            # Tokens in flight arrive with their layer-``layer`` input: park them all in this layer's
            # aux cache; the selected ones are read back right below, the others wait for a revival.
            self._store_aux(layer, flight_hidden, flight.index, flight.valid)
        aux = st.aux.get(layer)
        if aux is None:
            aux = _Aux(hidden[:, :0], torch.full((b, length + 1), -1, dtype=torch.long, device=hidden.device))
        cols, valid = pack(revive)
        source = torch.gather(aux.lookup, 1, cols).clamp(min=0)
        revived = gather_seq(aux.hidden, source) if aux.hidden.shape[1] else hidden.new_zeros(b, cols.shape[1], hidden.shape[-1])
        n_revived = valid.sum(1)
        for row in range(b):
            if int(n_revived[row]):
                self.handle.stats.add(call=st.call, row=row, layer=layer, before=0, after=int(n_revived[row]),
                                      kind=f"{self.sequence.stats_prefix}-revive")
        st.cur = _Slots(torch.cat([cols, st.cur.index[:, -q:]], 1), torch.cat([valid, st.cur.valid[:, -q:]], 1))
        return torch.cat([revived, hidden[:, -q:]], 1)

    def revive_kwargs(self, layer: int, hidden: torch.Tensor, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Decoding step with revival: revived tokens' positions, and masks by sequence index."""
        st = self.state
        new = dict(kwargs)
        q = st.q_len
        flight = st.cur.index[:, :-q]
        if flight.shape[1]:
            positions = torch.gather(st.positions, 1, flight.clamp(max=st.length - 1))
            cos, sin = self.rotary(hidden, positions)
            new_cos, new_sin = kwargs["position_embeddings"]
            b = hidden.shape[0]
            new["position_embeddings"] = (torch.cat([cos, new_cos.expand(b, -1, -1)], 1),
                                          torch.cat([sin, new_sin.expand(b, -1, -1)], 1))
            if kwargs.get("position_ids") is not None:
                new["position_ids"] = torch.cat([positions, kwargs["position_ids"].expand(b, -1)], 1)
        slots = st.slots[layer].append(st.cur.index, st.cur.valid)
        visible = slots.valid & torch.gather(st.visible, 1, slots.index.clamp(max=st.length))
        new["attention_mask"] = build_mask(self.impl, st.cur.index, slots.index, visible, hidden.dtype)
        st.slots[layer] = slots
        return new

    # ------------------------------------------------------------------ layer wrapper
    def wrap_layer(self, layer: torch.nn.Module, index: int):
        original = layer.forward

        def forward(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            st = self.state
            if args:
                raise NotImplementedError("tokenprune expects decoder layers to be called with keyword arguments")
            if st.valid is None:  # not a generation this runtime saw start (e.g. a cache filled before patching)
                return original(hidden_states, **kwargs)
            if st.prefill:
                if index in self.schedule:
                    hidden_states = self.prune_prefill(index, hidden_states)
                st.slots[index] = st.cur
                for row in range(hidden_states.shape[0]):
                    self._record_layer(row, index, int(st.cur.valid[row].sum()))
                if not st.active:
                    return original(hidden_states, **kwargs)
                return original(hidden_states, **self.prefill_kwargs(kwargs, hidden_states.dtype))
            if not st.active:
                return original(hidden_states, **kwargs)
            if not self.revive:
                return original(hidden_states, **self.decode_mask_kwargs(index, hidden_states, kwargs))
            if index in self.schedule:
                st.captured[index - 1]["cache"] = kwargs["past_key_values"]
                hidden_states = self.select_decode(index, hidden_states)
            out = original(hidden_states, **self.revive_kwargs(index, hidden_states, kwargs))
            flight = st.cur.index[:, :-st.q_len]
            if flight.shape[1]:
                st.depth.scatter_(1, torch.where(st.cur.valid[:, :-st.q_len], flight, st.length), index + 1)
                st.depth[:, st.length] = 0
            if index == self.depth - 1:  # the model's outputs cover the new tokens only
                return out[:, -st.q_len:]
            return out

        return forward

    # ------------------------------------------------------------------ KV policy
    def compress(self, index: int):
        def hook(module: Any, args: tuple, kwargs: dict, output: Any) -> None:
            st = self.state
            cache = kwargs.get("past_key_values")
            if not st.prefill or st.valid is None or cache is None:  # use_cache=False: nothing to compress
                return
            own_slots = st.active and index in st.slots  # this layer builds its own masks at decoding
            valid = st.slots[index].valid if own_slots else st.valid
            layer = cache.layers[index]
            b, n = valid.shape
            n_valid = valid.sum(1)
            # Each row as if alone: a prompt no longer than the window is kept whole.
            counts = torch.tensor([c if c <= self.kv.window else self.kv.num_kept(c) for c in n_valid.tolist()],
                                  device=valid.device)
            kept = int(counts.max())
            w = min(self.kv.window, n)
            if not (n > self.kv.window and kept < n):
                return
            scores = self.kv.score(_KVView(self, index, layer.keys, layer.values, valid))
            hk = scores.shape[1]
            arange = torch.arange(n, device=scores.device)
            keep = rank_keep(scores, valid[:, None, :].expand(b, hk, n), (arange >= n - w).expand(b, hk, n),
                             counts[:, None].expand(b, hk))
            # Rows keeping fewer valid entries than ``kept`` keep their first slots as masked fillers.
            keep |= arange[None, None, :] < (kept - counts)[:, None, None]
            order = torch.sort(torch.where(keep, arange, arange + n), dim=-1).indices[..., :kept]
            idx = order.unsqueeze(-1).expand(-1, -1, -1, layer.keys.shape[-1])
            layer.keys = torch.gather(layer.keys, 2, idx)
            layer.values = torch.gather(layer.values, 2, idx)
            slot_valid = torch.arange(kept, device=valid.device)[None] >= (kept - counts)[:, None]
            if own_slots:
                # Which token a slot holds now differs per head; decoding masks need validity only.
                st.slots[index] = _Slots(torch.full_like(slot_valid, -1, dtype=torch.long), slot_valid)
            else:
                st.kv_slot_valid = slot_valid
            for row in range(b):
                self.handle.stats.add(call=st.call, row=row, layer=index, before=int(n_valid[row]),
                                      after=int(counts[row]), kind="kv")

        return hook


# --------------------------------------------------------------------------- entry point

#: attention implementations each kind of policy supports.
SEQUENCE_ATTENTION = ("eager", "sdpa", *FLASH)
REVIVE_ATTENTION = ("eager", "sdpa")
KV_ATTENTION = ("eager", "sdpa")


def install(handle: PatchHandle, adapter: ModelAdapter, methods: list[Pruner]) -> DecoderRuntime:
    """Install one runtime for the decoder-stage ``methods`` (at most one sequence policy and one KV
    policy; :func:`tokenprune.compose` checks this first)."""
    sequence = [m for m in methods if isinstance(m, SequencePruner)]
    kv = [m for m in methods if isinstance(m, KVPruner)]
    if len(sequence) > 1 or len(kv) > 1 or len(sequence) + len(kv) != len(methods):
        raise ValueError(f"one decoder runtime takes at most one sequence and one KV policy, got {methods!r}")
    seq_policy = sequence[0] if sequence else None
    kv_policy = kv[0] if kv else None
    impl = adapter.attn_implementation()
    for method, allowed in ((seq_policy, REVIVE_ATTENTION if seq_policy is not None and seq_policy.revives
                             else SEQUENCE_ATTENTION), (kv_policy, KV_ATTENTION)):
        if method is not None and impl not in allowed:
            raise NotImplementedError(
                f"{type(method).__name__} supports attention implementations {', '.join(allowed)}, got {impl!r}"
            )
    if seq_policy is not None and seq_policy.revives and kv_policy is not None:
        raise ValueError(
            f"{type(seq_policy).__name__}(revive=True) re-selects prompt tokens at every decoding step, which a "
            f"compressed KV cache ({type(kv_policy).__name__}) no longer holds; use revive=False to combine them"
        )
    runtime = DecoderRuntime(handle, adapter, seq_policy, kv_policy)
    runtime.install()
    return runtime
