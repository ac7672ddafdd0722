"""In-LLM visual pruning in Hugging Face decoders (FastV).

Decoder layers ``>= K`` are wrapped; layer ``K - 1``'s query/key projections are observed. At
prefill, layer ``K``'s wrapper scores the image tokens with the attention the scoring query pays
them at layer ``K - 1`` (computed by :func:`tokenprune.kernels.attention_topk` from that layer's
queries and post-RoPE keys, so every layer keeps its SDPA/flash attention), keeps the top ones per
image plus every text token, and gathers the hidden states; layers ``>= K`` then run on the shorter
sequence and their KV cache holds only kept tokens. At decoding steps the wrappers drop the pruned
columns from the attention mask of layers ``>= K``.

Positions: kept tokens keep their original positions (their RoPE never changes and the cached keys
of layers ``< K`` stay valid); the position ids of new tokens are the unpatched ones.

Batches: each row is pruned on its own. Rows that keep fewer tokens than the longest row are padded
on the left with masked *filler* slots (pruned tokens that nobody may attend to), so a row's output
never depends on the other rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from tokenprune.integrations.hf.adapters import VisionLanguageAdapter
from tokenprune.kernels import attention_topk
from tokenprune.methods.base import InLLMPruner, topk_ascending
from tokenprune.patching import PatchHandle

SUPPORTED_ATTENTION = ("eager", "sdpa", "flash_attention_2", "flash_attention_3")


@dataclass
class _PassState:
    """What the current forward pass knows; reset at every prefill."""

    input_ids: Optional[torch.Tensor] = None
    attention_mask: Optional[torch.Tensor] = None
    prefill: bool = False
    captured: dict[str, torch.Tensor] = field(default_factory=dict)
    kept: Optional[torch.Tensor] = None  # [B, L'] original positions (fillers first)
    key_valid: Optional[torch.Tensor] = None  # [B, L'] False for fillers and padding
    prefill_len: int = 0
    # transformed layer kwargs of the current pass, keyed by the identity of the incoming ones
    cache_key: Any = None
    cache_value: Any = None


def _gather_seq(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``t[b, index[b]]`` along dim 1 for ``t`` ``[B or 1, L, ...]`` and ``index`` ``[B, L']``."""
    t = t.expand(index.shape[0], *t.shape[1:])
    idx = index.view(*index.shape, *([1] * (t.dim() - 2))).expand(*index.shape, *t.shape[2:])
    return torch.gather(t, 1, idx)


class FastVRuntime:
    def __init__(self, handle: PatchHandle, adapter: VisionLanguageAdapter, method: InLLMPruner):
        self.handle, self.adapter, self.method = handle, adapter, method
        self.layer = method.layer
        self.state = _PassState()
        self.impl = adapter.attn_implementation()

    # ------------------------------------------------------------------ hooks
    def on_model_forward(self, module: Any, args: tuple, kwargs: dict) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        past = kwargs.get("past_key_values")
        prefill = past is None or past.get_seq_length() == 0
        if prefill:
            self.state = _PassState(input_ids=input_ids, attention_mask=kwargs.get("attention_mask"), prefill=True)
        else:
            self.state.prefill = False
            self.state.cache_key = None

    def on_attention_input(self, module: Any, args: tuple, kwargs: dict) -> None:
        if self.state.prefill and self.state.kept is None:
            self.state.captured["position_embeddings"] = kwargs["position_embeddings"]

    def capture(self, name: str):
        def hook(module: Any, inputs: tuple, output: torch.Tensor) -> None:
            if self.state.prefill and self.state.kept is None:
                last_only = name == "q" and getattr(self.method, "score", "last") == "last"
                self.state.captured[name] = output[:, -1:] if last_only else output

        return hook

    # ------------------------------------------------------------------ selection
    def select(self, hidden_states: torch.Tensor) -> None:
        """Decide the kept positions of every row (at layer K, prefill)."""
        st = self.state
        if st.input_ids is None:
            raise ValueError("FastV needs input_ids to locate the image tokens; inputs_embeds alone is not supported")
        b, length = st.input_ids.shape
        attn = self.adapter.decoder_layers[self.layer - 1].self_attn
        head_dim = attn.head_dim
        q_len = st.captured["q"].shape[1]
        q = st.captured["q"].view(b, q_len, -1, head_dim).transpose(1, 2)
        k = st.captured["k"].view(b, length, -1, head_dim).transpose(1, 2)
        cos, sin = st.captured["position_embeddings"]
        rotary = self.adapter.apply_rotary(attn)
        q = rotary(q, q, cos[:, -q_len:], sin[:, -q_len:])[0]
        k = rotary(k, k, cos, sin)[1]
        padding = st.attention_mask.bool() if st.attention_mask is not None else None
        if getattr(self.method, "score", "last") == "text_mean":
            scores = self._text_mean_scores(q, k, padding, attn.scaling)
        else:
            _, scores = attention_topk(q, k, 1, key_padding_mask=padding, scale=attn.scaling, impl=self.method.impl)

        call = self.handle.stats.new_call()
        kept_rows = []
        for row in range(b):
            keep = torch.ones(length, dtype=torch.bool, device=scores.device)
            for image, (start, end) in enumerate(self.adapter.image_runs(st.input_ids[row])):
                n_kept = self.method.num_kept(end - start)
                chosen = topk_ascending(scores[row, start:end], n_kept)
                keep[start:end] = False
                keep[start + chosen] = True
                self.handle.stats.add(call=call, row=row, image=image, layer=self.layer, before=end - start,
                                      after=n_kept, kind="llm", kept=tuple(chosen.tolist()))
            kept_rows.append(torch.nonzero(keep).flatten())
            valid = padding[row] if padding is not None else torch.ones(length, dtype=torch.bool, device=keep.device)
            self.handle.stats.add(call=call, row=row, layer=self.layer, before=int(valid.sum()),
                                  after=int(valid[keep].sum()), kind="llm-sequence")

        new_len = max(r.numel() for r in kept_rows)
        st.prefill_len = length
        st.captured.clear()
        if new_len == length:  # nothing pruned in any row: leave this pass untouched
            st.kept = torch.empty(0)
            return
        kept = torch.empty(b, new_len, dtype=torch.long, device=hidden_states.device)
        key_valid = torch.ones(b, new_len, dtype=torch.bool, device=hidden_states.device)
        for row, rows_kept in enumerate(kept_rows):
            fill = new_len - rows_kept.numel()
            if fill:
                dropped = torch.ones(length, dtype=torch.bool, device=rows_kept.device)
                dropped[rows_kept] = False
                kept[row, :fill] = torch.nonzero(dropped).flatten()[:fill]
                key_valid[row, :fill] = False
            kept[row, fill:] = rows_kept
        if padding is not None:
            key_valid &= torch.gather(padding, 1, kept)
        st.kept, st.key_valid = kept, key_valid

    def _text_mean_scores(self, q: torch.Tensor, k: torch.Tensor, padding: Optional[torch.Tensor],
                          scale: float) -> torch.Tensor:
        """``score="text_mean"``: per row, the attention of the text after its last image (the
        instruction), averaged over those queries and heads. ``[B, L]``."""
        st = self.state
        b, length = st.input_ids.shape
        scores = torch.zeros(b, length, device=k.device)
        for row in range(b):
            runs = self.adapter.image_runs(st.input_ids[row])
            if not runs:
                continue
            queries = length - runs[-1][1]
            if queries == 0:  # the prompt ends with an image: fall back to its last token
                queries = 1
            mask = padding[row : row + 1] if padding is not None else None
            _, scores[row] = attention_topk(q[row : row + 1, :, -queries:], k[row : row + 1], 1,
                                            key_padding_mask=mask, scale=scale, impl=self.method.impl)
        return scores

    @property
    def pruning(self) -> bool:
        return self.state.kept is not None and self.state.kept.numel() > 0

    # ------------------------------------------------------------------ masks
    def _mask(self, q_len: int, kv_len: int, dtype: torch.dtype, prefill: bool) -> Optional[torch.Tensor]:
        """Attention mask of a wrapped layer in the format of the attention implementation."""
        st = self.state
        n_kept = st.kept.shape[1]
        if self.impl != "eager" and bool(st.key_valid.all()):
            # No padding, no filler: SDPA's is_causal / flash's fast path (eager needs a real mask).
            return None
        b = st.kept.shape[0]
        device = st.kept.device
        key_valid = torch.cat([st.key_valid, st.key_valid.new_ones(b, kv_len - n_kept)], dim=1)
        if self.impl.startswith("flash"):
            return key_valid.to(torch.long)
        query_pos = torch.arange(kv_len - q_len, kv_len, device=device)
        key_pos = torch.arange(kv_len, device=device)
        allowed = (key_pos[None, :] <= query_pos[:, None])[None] & key_valid[:, None, :]
        # A filler/padding query row would see nothing: let it see itself (its output is never used).
        allowed |= (key_pos[None, :] == query_pos[:, None])[None]
        allowed = allowed[:, None]  # [B, 1, q, kv]
        if self.impl == "sdpa":
            return allowed
        mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
        return mask.masked_fill(~allowed, torch.finfo(dtype).min)

    def layer_kwargs(self, hidden_states: torch.Tensor, kwargs: dict[str, Any]) -> dict[str, Any]:
        st = self.state
        key = (id(kwargs.get("attention_mask")), id(kwargs.get("position_embeddings")), st.prefill)
        if st.cache_key == key:
            return st.cache_value
        new = dict(kwargs)
        q_len = hidden_states.shape[1]
        if st.prefill:
            if "position_embeddings" in kwargs and kwargs["position_embeddings"] is not None:
                cos, sin = kwargs["position_embeddings"]
                new["position_embeddings"] = (_gather_seq(cos, st.kept), _gather_seq(sin, st.kept))
            if kwargs.get("position_ids") is not None:
                new["position_ids"] = _gather_seq(kwargs["position_ids"], st.kept)
            kv_len = st.kept.shape[1]
        else:
            past = kwargs.get("past_key_values")
            kv_len = past.layers[self.layer].get_seq_length() + q_len
        new["attention_mask"] = self._mask(q_len, kv_len, hidden_states.dtype, st.prefill)
        st.cache_key, st.cache_value = key, new
        return new

    def wrap_layer(self, layer: torch.nn.Module, index: int):
        original = layer.forward

        def forward(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            st = self.state
            if index == self.layer and st.prefill and st.kept is None:
                self.select(hidden_states)
                if self.pruning:
                    hidden_states = _gather_seq(hidden_states, st.kept)
            if not self.pruning:
                return original(hidden_states, *args, **kwargs)
            if args:
                raise NotImplementedError("tokenprune expects decoder layers to be called with keyword arguments")
            return original(hidden_states, **self.layer_kwargs(hidden_states, kwargs))

        return forward


def install(handle: PatchHandle, adapter: VisionLanguageAdapter, method: InLLMPruner) -> None:
    depth = adapter.num_layers
    if not 1 <= method.layer < depth:
        raise ValueError(
            f"layer must be in [1, {depth - 1}] for this model ({depth} decoder layers), got {method.layer}"
        )
    runtime = FastVRuntime(handle, adapter, method)
    if runtime.impl not in SUPPORTED_ATTENTION:
        raise NotImplementedError(
            f"FastV supports attention implementations {', '.join(SUPPORTED_ATTENTION)}, got {runtime.impl!r}"
        )
    model = adapter.model
    handle.add_hook(model.register_forward_pre_hook(runtime.on_model_forward, with_kwargs=True))
    attn = adapter.decoder_layers[method.layer - 1].self_attn
    handle.add_hook(attn.register_forward_pre_hook(runtime.on_attention_input, with_kwargs=True))
    handle.add_hook(attn.q_proj.register_forward_hook(runtime.capture("q")))
    handle.add_hook(attn.k_proj.register_forward_hook(runtime.capture("k")))
    for index in range(method.layer, depth):
        layer = adapter.decoder_layers[index]
        handle.set_attr(layer, "forward", runtime.wrap_layer(layer, index))
