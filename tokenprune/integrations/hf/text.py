"""Prompt / KV pruning in Hugging Face causal LMs: LazyLLM and SnapKV (stage ``"text"``).

Both runtimes observe the decoder through hooks and instance-level wrappers recorded on the patch
handle (``tp.patch`` undoes them exactly), and both keep every layer on its SDPA/eager attention:
scores come from :func:`tokenprune.kernels.attention_topk` on the queries/keys of the layer that
votes.

**LazyLLM** (:class:`LazyLLMRuntime`). The runtime tracks, per decoder layer ``i >= first pruning
layer``, the *slots* of its KV cache: which sequence index each slot holds and whether it is valid
(fillers and padding are not). Layers therefore hold KV caches of different lengths: layer ``i``
holds the tokens alive at ``i`` (and any revived later), plus the generated tokens. Every layer
gets its own attention mask built from its slots (causal by sequence index, so original positions
and RoPE are untouched).

* Prefill: before each scheduled layer ``l`` the alive tokens are ranked by the last prompt token's
  attention at layer ``l - 1``; the top ``keep_l`` of each row's prompt (plus the last ``window``
  tokens) continue. Dropped tokens' hidden states (the input of layer ``l``) go to the aux cache of
  layer ``l``. Rows that keep fewer tokens than the longest row are padded with masked *filler*
  slots, so rows stay independent.
* Decoding (``revive=True``): at every step the selection is repeated at each scheduled layer with
  the new token as the scorer, among the prompt tokens visible at the previous layer. A selected
  token absent from layer ``l``'s cache (pruned there earlier) is *revived*: its hidden state comes
  from the aux cache of layer ``l`` and it is computed at layers ``l, l+1, ...`` together with the new
  token (as extra query rows placed before it, attending causally to the visible keys), until a
  scheduled layer drops it again (its hidden state then goes to that layer's aux cache). A token's
  computation at a layer happens at most once. Prompt tokens not selected at a step are masked out
  of that step's attention at deeper layers.
* ``revive=False``: prefill pruning only; decoding attends to every cached slot.

If nothing is pruned (a schedule keeping everything), every layer runs untouched: the output is the
unpatched model's bit for bit.

**SnapKV** (:class:`SnapKVRuntime`): after each layer's prefill the layer's cache is compressed per
KV head to the top pooled-attention keys plus the observation window. Rows of a padded batch keep
the same number of slots; a row that keeps fewer valid tokens keeps some of its left padding
(masked), in the same slots for every head, so one 2-D attention mask still describes the cache.
At decoding steps the model's 2-D attention mask is rewritten to the compressed layout; position
ids are untouched (original positions).

Limitations: left padding only; greedy/sampling ``generate`` (not beam search, whose cache
reordering the slot tables do not follow); a generation must start from an empty cache (the
prefill is where pruning happens); eager and SDPA attention; no sliding-window attention beyond
the window.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from tokenprune.integrations.hf.adapters import ModelAdapter
from tokenprune.integrations.hf.inllm import _gather_seq
from tokenprune.kernels import attention_topk
from tokenprune.methods.base import TextPruner, resolve_keep
from tokenprune.methods.lazyllm import LazyLLM
from tokenprune.methods.snapkv import SnapKV
from tokenprune.patching import PatchHandle

SUPPORTED_ATTENTION = ("eager", "sdpa")


# --------------------------------------------------------------------------- shared helpers


def build_mask(impl: str, q_index: torch.Tensor, k_index: torch.Tensor, k_visible: torch.Tensor,
               dtype: torch.dtype) -> torch.Tensor:
    """Attention mask ``[B, 1, q, kv]`` for queries that are the last ``q`` key slots.

    ``q_index`` ``[B, q]`` / ``k_index`` ``[B, kv]`` are sequence indices (causality is by index,
    which orders tokens as their original positions do); ``k_visible`` ``[B, kv]`` hides fillers,
    padding and pruned tokens. A query that would see nothing (a filler) sees its own slot.
    """
    q, kv = q_index.shape[1], k_index.shape[1]
    allowed = (k_index[:, None, :] <= q_index[:, :, None]) & k_visible[:, None, :]
    rows = torch.arange(q, device=allowed.device)
    allowed[:, rows, rows + (kv - q)] = True
    allowed = allowed[:, None]
    if impl == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


def rank_keep(scores: torch.Tensor, candidate: torch.Tensor, forced: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Keep mask (same shape as ``scores``, ``[..., n]``): the ``k`` (``[...]``) best candidates by score,
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
        raise ValueError("text pruning needs left padding (or none): the last prompt token of every row must be real")
    return valid


def _check_window(adapter: ModelAdapter, length: int) -> None:
    cfg = adapter.text_model().config
    window = getattr(cfg, "sliding_window", None)
    if window is not None and "sliding_attention" in (getattr(cfg, "layer_types", None) or ["sliding_attention"]):
        if length > window:
            raise NotImplementedError(
                f"text pruning does not support sliding-window attention beyond the window ({window} tokens); "
                f"the prompt has {length}"
            )


# --------------------------------------------------------------------------- LazyLLM


@dataclass
class _Slots:
    """KV-cache slots of one layer: sequence index and validity, ``[B, n]`` each."""

    index: torch.Tensor
    valid: torch.Tensor

    def append(self, index: torch.Tensor, valid: torch.Tensor) -> "_Slots":
        return _Slots(torch.cat([self.index, index], 1), torch.cat([self.valid, valid], 1))


@dataclass
class _Aux:
    """Aux cache of one scheduled layer ``l``: input hidden states of tokens pruned at ``l``."""

    hidden: torch.Tensor  # [B, m, D]
    lookup: torch.Tensor  # [B, L + 1] row of each prompt index in ``hidden`` (-1: absent; column L: dummy)


@dataclass
class _LazyState:
    length: int = 0  # L, padded prompt length
    active: bool = False  # something was pruned: layers >= first run on slots
    prefill: bool = False
    call: int = 0
    valid: Optional[torch.Tensor] = None  # [B, L] real prompt tokens
    n_valid: Optional[torch.Tensor] = None  # [B]
    positions: Optional[torch.Tensor] = None  # [B, L] RoPE positions of the prompt
    depth: Optional[torch.Tensor] = None  # [B, L + 1] layers each prompt token is computed at
    visible: Optional[torch.Tensor] = None  # [B, L + 1] prompt tokens visible at this step (col L: generated)
    slots: dict[int, _Slots] = field(default_factory=dict)
    aux: dict[int, _Aux] = field(default_factory=dict)
    cur: Optional[_Slots] = None  # the rows flowing through the layers now
    next_index: int = 0  # sequence index of the next new token
    q_len: int = 0  # new tokens in this decoding pass
    captured: dict[str, Any] = field(default_factory=dict)
    keep_counts: dict[int, torch.Tensor] = field(default_factory=dict)  # per scheduled layer, [B]
    # prefill kwargs transformed for the current ``cur`` (keyed by identities)
    kw_key: Any = None
    kw_value: Any = None


class LazyLLMRuntime:
    def __init__(self, handle: PatchHandle, adapter: ModelAdapter, method: LazyLLM):
        self.handle, self.adapter, self.method = handle, adapter, method
        self.depth = adapter.num_layers
        self.schedule = dict(method.resolve_schedule(self.depth))
        self.first = min(self.schedule)
        self.impl = adapter.attn_implementation()
        self.rotary = adapter.text_model().rotary_emb
        self.state = _LazyState()

    # ------------------------------------------------------------------ hooks
    def on_model_forward(self, module: Any, args: tuple, kwargs: dict) -> None:
        past = kwargs.get("past_key_values")
        hidden = kwargs.get("inputs_embeds")
        ids = kwargs.get("input_ids", args[0] if args else None)
        ref = ids if ids is not None else hidden
        b, q = ref.shape[0], ref.shape[1]
        if past is None or past.get_seq_length() == 0:
            _check_window(self.adapter, q)
            valid = _valid_prompt(kwargs.get("attention_mask"), b, q, ref.device)
            positions = kwargs.get("position_ids")
            if positions is None:
                positions = torch.arange(q, device=ref.device)[None]
            depth = torch.where(valid, self.depth, 0)
            self.state = _LazyState(
                length=q, prefill=True, call=self.handle.stats.new_call(), valid=valid, n_valid=valid.sum(1),
                positions=positions.expand(b, q), depth=torch.cat([depth, depth.new_zeros(b, 1)], 1),
                next_index=q,
            )
            self.state.cur = _Slots(torch.arange(q, device=ref.device).expand(b, q), valid)
            for row in range(b):
                for layer in range(self.first):
                    self.handle.stats.add(call=self.state.call, row=row, layer=layer, before=int(self.state.n_valid[row]),
                                          after=int(self.state.n_valid[row]), kind="text-prefill")
            return
        st = self.state
        st.prefill = False
        if st.valid is None:  # a cache filled before the patch: nothing of it was pruned
            return
        _check_window(self.adapter, st.next_index + q)
        st.q_len = q
        index = torch.arange(st.next_index, st.next_index + q, device=ref.device).expand(b, q)
        st.cur = _Slots(index, torch.ones(b, q, dtype=torch.bool, device=ref.device))
        st.next_index += q
        st.visible = torch.cat([st.valid, st.valid.new_ones(b, 1)], 1)

    def on_attention_input(self, module: Any, args: tuple, kwargs: dict) -> None:
        self.state.captured["rope"] = kwargs["position_embeddings"]

    def capture(self, name: str):
        def hook(module: Any, inputs: tuple, output: torch.Tensor) -> None:
            st = self.state
            if name == "q":
                st.captured["q"] = output[:, -1:]
            elif st.prefill:
                st.captured["k"] = output

        return hook

    # ------------------------------------------------------------------ scoring
    def _scores(self, layer: int, keys: torch.Tensor, key_visible: torch.Tensor) -> torch.Tensor:
        """Attention of the last token at ``layer - 1`` over ``keys`` ``[B, Hk, n, D]`` (post-RoPE)."""
        attn = self.adapter.decoder_layers[layer - 1].self_attn
        cap = self.state.captured
        b = keys.shape[0]
        q = cap["q"].view(b, 1, -1, attn.head_dim).transpose(1, 2)
        cos, sin = cap["rope"]
        q = self.adapter.apply_rotary(attn)(q, q, cos[:, -1:], sin[:, -1:])[0]
        _, scores = attention_topk(q, keys, 1, causal=False, scale=attn.scaling, key_padding_mask=key_visible,
                                   impl=self.method.impl)
        return scores

    def _keep_counts(self, layer: int) -> torch.Tensor:
        counts = self.state.keep_counts
        if layer not in counts:
            keep = self.schedule[layer]
            counts[layer] = torch.tensor([resolve_keep(keep, int(n)) for n in self.state.n_valid.tolist()],
                                         device=self.state.n_valid.device)
        return counts[layer]

    def _forced(self, index: torch.Tensor) -> torch.Tensor:
        return (index >= self.state.length - self.method.window) & (index < self.state.length)

    # ------------------------------------------------------------------ prefill
    def prune_prefill(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        st = self.state
        attn = self.adapter.decoder_layers[layer - 1].self_attn
        b, n = st.cur.index.shape
        k = st.captured.pop("k").view(b, n, -1, attn.head_dim).transpose(1, 2)
        cos, sin = st.captured["rope"]
        k = self.adapter.apply_rotary(attn)(k, k, cos, sin)[1]
        scores = self._scores(layer, k, st.cur.valid)
        kept = rank_keep(scores, st.cur.valid, self._forced(st.cur.index), self._keep_counts(layer))
        dropped = st.cur.valid & ~kept
        if not (st.active or bool(dropped.any())):
            return hidden  # nothing pruned yet: this layer runs untouched (padding stays in place)
        st.active = True
        cols, _ = pack(dropped)
        self._store_aux(layer, _gather_seq(hidden, cols), torch.gather(st.cur.index, 1, cols),
                        torch.gather(dropped, 1, cols))
        st.depth.scatter_(1, torch.where(dropped, st.cur.index, st.length), layer)
        st.depth[:, st.length] = 0
        cols, valid = pack(kept)
        st.cur = _Slots(torch.gather(st.cur.index, 1, cols), valid)
        return _gather_seq(hidden, cols)

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
        key = (id(kwargs.get("position_embeddings")), id(st.cur))
        if st.kw_key == key:
            return st.kw_value
        new = dict(kwargs)
        cos, sin = kwargs["position_embeddings"]
        new["position_embeddings"] = (_gather_seq(cos, st.cur.index), _gather_seq(sin, st.cur.index))
        if kwargs.get("position_ids") is not None:
            new["position_ids"] = _gather_seq(kwargs["position_ids"], st.cur.index)
        if self.impl == "sdpa" and bool(st.cur.valid.all()):
            # Slots are in sequence order and none is masked: plain causal attention (SDPA's fast path).
            new["attention_mask"] = None
        else:
            new["attention_mask"] = build_mask(self.impl, st.cur.index, st.cur.index, st.cur.valid, dtype)
        st.kw_key, st.kw_value = key, new
        return new

    # ------------------------------------------------------------------ decoding
    def select_decode(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """Repeat the selection for the new token at scheduled ``layer``; revive from the aux cache."""
        st = self.state
        length = st.length
        prev = st.slots[layer - 1] if layer - 1 in st.slots else None
        cache = st.captured["cache"]
        keys = cache.layers[layer - 1].keys
        b = keys.shape[0]
        if prev is None:  # layer - 1 keeps every prompt token (it is before the first scheduled layer)
            prev_index = torch.arange(keys.shape[2], device=keys.device).expand(b, -1)
            prev = _Slots(prev_index, torch.cat([st.valid, st.valid.new_ones(b, keys.shape[2] - length)], 1))
        visible = prev.valid & torch.gather(st.visible, 1, prev.index.clamp(max=length))
        scores = self._scores(layer, keys, visible)
        is_prompt = prev.index < length
        kept = rank_keep(scores, visible & is_prompt, self._forced(prev.index), self._keep_counts(layer))
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
        revived = _gather_seq(aux.hidden, source) if aux.hidden.shape[1] else hidden.new_zeros(b, cols.shape[1], hidden.shape[-1])
        n_revived = valid.sum(1)
        if bool((n_revived > 0).any()):
            for row in range(b):
                if int(n_revived[row]):
                    self.handle.stats.add(call=st.call, row=row, layer=layer, before=0, after=int(n_revived[row]),
                                          kind="text-revive")
        st.cur = _Slots(torch.cat([cols, st.cur.index[:, -q:]], 1), torch.cat([valid, st.cur.valid[:, -q:]], 1))
        return torch.cat([revived, hidden[:, -q:]], 1)

    def decode_kwargs(self, layer: int, hidden: torch.Tensor, kwargs: dict[str, Any]) -> dict[str, Any]:
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
            if st.prefill:
                if index in self.schedule:
                    hidden_states = self.prune_prefill(index, hidden_states)
                st.slots[index] = st.cur
                for row in range(hidden_states.shape[0]):
                    self.handle.stats.add(call=st.call, row=row, layer=index, before=int(st.n_valid[row]),
                                          after=int(st.cur.valid[row].sum()), kind="text-prefill")
                if not st.active:
                    return original(hidden_states, **kwargs)
                return original(hidden_states, **self.prefill_kwargs(kwargs, hidden_states.dtype))
            if not st.active:
                return original(hidden_states, **kwargs)
            if index in self.schedule and self.method.revive:
                st.captured["cache"] = kwargs["past_key_values"]
                hidden_states = self.select_decode(index, hidden_states)
            out = original(hidden_states, **self.decode_kwargs(index, hidden_states, kwargs))
            flight = st.cur.index[:, :-st.q_len]
            if flight.shape[1]:
                st.depth.scatter_(1, torch.where(st.cur.valid[:, :-st.q_len], flight, st.length), index + 1)
                st.depth[:, st.length] = 0
            if index == self.depth - 1:  # the model's outputs cover the new tokens only
                return out[:, -st.q_len:]
            return out

        return forward


def install_lazyllm(handle: PatchHandle, adapter: ModelAdapter, method: LazyLLM) -> None:
    runtime = LazyLLMRuntime(handle, adapter, method)
    handle.runtime = runtime  # introspection (tests, benchmarks): slots, aux cache, depths
    handle.add_hook(adapter.text_model().register_forward_pre_hook(runtime.on_model_forward, with_kwargs=True))
    for layer in runtime.schedule:
        attn = adapter.decoder_layers[layer - 1].self_attn
        handle.add_hook(attn.register_forward_pre_hook(runtime.on_attention_input, with_kwargs=True))
        handle.add_hook(attn.q_proj.register_forward_hook(runtime.capture("q")))
        handle.add_hook(attn.k_proj.register_forward_hook(runtime.capture("k")))
    for index in range(runtime.first, runtime.depth):
        layer = adapter.decoder_layers[index]
        handle.set_attr(layer, "forward", runtime.wrap_layer(layer, index))


# --------------------------------------------------------------------------- SnapKV


@dataclass
class _SnapState:
    length: int = 0
    call: int = 0
    valid: Optional[torch.Tensor] = None  # [B, L]
    counts: Optional[torch.Tensor] = None  # [B] valid tokens kept per row
    kept: int = 0  # slots per layer after compression (0: no compression this call)
    slot_valid: Optional[torch.Tensor] = None  # [B, kept]
    prefill: bool = False
    captured: dict[str, Any] = field(default_factory=dict)


def snapkv_scores(q: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor, window: int, kernel: int,
                  scale: float, impl: str = "auto") -> torch.Tensor:
    """Pooled SnapKV votes ``[B, Hk, L - window]`` of the prompt keys outside the window.

    ``q`` ``[B, Hq, window, D]`` the window's queries, ``keys`` ``[B, Hk, L, D]`` (both post-RoPE),
    ``valid`` ``[B, L]``. Per KV head: softmax attention of the window queries over the whole prompt
    (causal), averaged over the window and the query heads of the group, then average-pooled over
    key positions (width ``kernel``, zero padding counted, as SnapKV/kvpress do).
    """
    b, hq, w, d = q.shape
    hk, length = keys.shape[1], keys.shape[2]
    group = hq // hk
    votes = torch.stack([
        attention_topk(q[:, h * group:(h + 1) * group], keys[:, h:h + 1], 1, key_start=0, key_end=length - w,
                       causal=True, scale=scale, key_padding_mask=valid, impl=impl)[1]
        for h in range(hk)
    ], 1)
    return torch.nn.functional.avg_pool1d(votes, kernel, stride=1, padding=kernel // 2)


class SnapKVRuntime:
    def __init__(self, handle: PatchHandle, adapter: ModelAdapter, method: SnapKV):
        self.handle, self.adapter, self.method = handle, adapter, method
        self.state = _SnapState()

    def on_model_forward(self, module: Any, args: tuple, kwargs: dict) -> Optional[tuple[tuple, dict]]:
        past = kwargs.get("past_key_values")
        ids = kwargs.get("input_ids", args[0] if args else None)
        ref = ids if ids is not None else kwargs.get("inputs_embeds")
        b, q = ref.shape[0], ref.shape[1]
        st = self.state
        if past is None or past.get_seq_length() == 0:
            _check_window(self.adapter, q)
            valid = _valid_prompt(kwargs.get("attention_mask"), b, q, ref.device)
            counts = torch.tensor([self.method.num_kept(int(n)) for n in valid.sum(1).tolist()], device=ref.device)
            kept = int(counts.max())
            compress = q > self.method.window and kept < q
            self.state = _SnapState(length=q, call=self.handle.stats.new_call(), valid=valid, counts=counts,
                                    kept=kept if compress else 0, prefill=True)
            if compress:
                self.state.slot_valid = torch.arange(kept, device=ref.device)[None] >= (kept - counts)[:, None]
            return None
        st.prefill = False
        mask = kwargs.get("attention_mask")
        if st.kept and mask is not None and mask.dim() == 2:
            kwargs = dict(kwargs)
            kwargs["attention_mask"] = torch.cat([st.slot_valid.to(mask.dtype), mask[:, st.length:]], 1)
            return args, kwargs
        return None

    def on_attention_input(self, module: Any, args: tuple, kwargs: dict) -> None:
        if self.state.prefill and self.state.kept:
            self.state.captured["rope"] = kwargs["position_embeddings"]

    def capture_q(self, module: Any, inputs: tuple, output: torch.Tensor) -> None:
        if self.state.prefill and self.state.kept:
            self.state.captured["q"] = output[:, -self.method.window:]

    def compress(self, index: int):
        def hook(module: Any, args: tuple, kwargs: dict, output: Any) -> None:
            st = self.state
            if not (st.prefill and st.kept):
                return
            cache = kwargs.get("past_key_values")
            if cache is None:  # use_cache=False: nothing to compress
                return
            layer = cache.layers[index]
            attn = module.self_attn
            b, length = st.valid.shape
            w = min(self.method.window, length)
            q = st.captured["q"].view(b, w, -1, attn.head_dim).transpose(1, 2)
            cos, sin = st.captured["rope"]
            q = self.adapter.apply_rotary(attn)(q, q, cos[:, -w:], sin[:, -w:])[0]
            votes = snapkv_scores(q, layer.keys, st.valid, w, self.method.kernel, attn.scaling, self.method.impl)
            hk = votes.shape[1]
            scores = torch.cat([votes, votes.new_zeros(b, hk, w)], -1)
            arange = torch.arange(length, device=scores.device)
            candidate = st.valid[:, None, :].expand(b, hk, length)
            forced = (arange >= length - w).expand(b, hk, length)
            keep = rank_keep(scores, candidate, forced, st.counts[:, None].expand(b, hk))
            # Rows keeping fewer valid tokens than ``kept`` keep their first padding slots (masked).
            keep |= (arange[None, None, :] < (st.kept - st.counts)[:, None, None])
            order = torch.sort(torch.where(keep, arange, arange + length), dim=-1).indices[..., : st.kept]
            idx = order.unsqueeze(-1).expand(-1, -1, -1, layer.keys.shape[-1])
            layer.keys = torch.gather(layer.keys, 2, idx)
            layer.values = torch.gather(layer.values, 2, idx)
            for row in range(b):
                self.handle.stats.add(call=st.call, row=row, layer=index, before=int(st.valid[row].sum()),
                                      after=int(st.counts[row]), kind="kv")

        return hook


def install_snapkv(handle: PatchHandle, adapter: ModelAdapter, method: SnapKV) -> None:
    runtime = SnapKVRuntime(handle, adapter, method)
    handle.runtime = runtime
    handle.add_hook(adapter.text_model().register_forward_pre_hook(runtime.on_model_forward, with_kwargs=True))
    for index, layer in enumerate(adapter.decoder_layers):
        handle.add_hook(layer.self_attn.register_forward_pre_hook(runtime.on_attention_input, with_kwargs=True))
        handle.add_hook(layer.self_attn.q_proj.register_forward_hook(runtime.capture_q))
        handle.add_hook(layer.register_forward_hook(runtime.compress(index), with_kwargs=True))


# --------------------------------------------------------------------------- entry point


def install(handle: PatchHandle, adapter: ModelAdapter, method: TextPruner) -> None:
    impl = adapter.attn_implementation()
    if impl not in SUPPORTED_ATTENTION:
        raise NotImplementedError(
            f"{type(method).__name__} supports attention implementations {', '.join(SUPPORTED_ATTENTION)}, got {impl!r}"
        )
    if isinstance(method, LazyLLM):
        install_lazyllm(handle, adapter, method)
    elif isinstance(method, SnapKV):
        install_snapkv(handle, adapter, method)
    else:
        raise NotImplementedError(f"no Hugging Face runtime for {type(method).__name__}")
