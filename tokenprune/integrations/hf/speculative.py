"""Tree speculative decoding inside Hugging Face ``generate``.

Two entry points, one loop (:func:`tokenprune.speculative.decode.speculative_generate`):

* ``model.generate(**inputs, custom_generate=tree_generate, draft_tree=tp.DraftTree(...))``:
  transformers >= 5 calls a callable ``custom_generate`` with the prepared ``input_ids``, logits
  processors, stopping criteria, generation config and model kwargs (``past_key_values`` holds the
  cache it prepared); extra keyword arguments in its signature (``draft_tree``) are forwarded.
* ``tp.patch(model, tp.DraftTree(...))`` / ``tp.prune(tp.DraftTree(...))(model.generate)``: the
  patch replaces ``model.generate`` on the instance by a call with ``custom_generate=tree_generate``.

The target forward over a tree passes a 4-D additive mask ``[1, 1, N, prefix + N]`` (used as-is by
transformers' mask preparation) and ``position_ids = prefix + depth``, so SDPA and eager attention
work; FlashAttention cannot take arbitrary masks and is refused.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from tokenprune.patching import PatchHandle, install
from tokenprune.speculative.decode import speculative_generate
from tokenprune.speculative.kv import check_cache, keep_positions
from tokenprune.speculative.tree import TokenTree

__all__ = ["HFTarget", "tree_generate", "patch_model", "SUPPORTED_MODEL_TYPES"]

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
_UNSUPPORTED_OUTPUTS = ("output_scores", "output_logits", "output_attentions", "output_hidden_states")


def check_model(model: Any) -> None:
    """Raise ``NotImplementedError`` for models the tree verifier cannot run exactly."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise NotImplementedError(
            f"DraftTree supports decoder-only text models of types {', '.join(SUPPORTED_MODEL_TYPES)}; "
            f"got {model_type!r} ({type(model).__name__})"
        )
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        raise NotImplementedError("DraftTree does not support sliding-window attention (cache not position-indexed)")
    attn = getattr(config, "_attn_implementation", "sdpa")
    if attn not in ("sdpa", "eager"):
        raise NotImplementedError(f"DraftTree needs attn_implementation 'sdpa' or 'eager' (4-D tree masks), got {attn!r}")


class HFTarget:
    """A transformers causal LM plus its KV cache, as the speculative loop's target (batch 1)."""

    def __init__(self, model: Any, cache: Any):
        self.model = model
        self.cache = cache
        self.prefix_len = 0

    @property
    def device(self) -> torch.device:
        return self.model.device

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)[None]
        out = self.model(input_ids=ids, position_ids=positions, past_key_values=self.cache, use_cache=True,
                         logits_to_keep=1)
        check_cache(self.cache)
        # The last prompt token's KV is kept: the first tree root is the token sampled from it.
        self.prefix_len = ids.shape[1]
        return out.logits[0, -1]

    def prefill_tree(self, ids: torch.Tensor, tree: TokenTree) -> torch.Tensor:
        """One forward over the prompt minus its last token (causal) and a tree rooted at that token."""
        p, n = ids.shape[1], len(tree)
        dtype = self._mask_dtype()
        mask = torch.full((p + n, p + n), torch.finfo(dtype).min, dtype=dtype)
        mask[:p, :p].triu_(1)  # causal prompt block: 0 on and below the diagonal
        mask[p:] = tree.attention_mask(p, dtype=dtype)[0, 0]
        out = self.model(
            input_ids=torch.cat([ids[0], tree.token_tensor(ids.device)])[None],
            position_ids=torch.cat([torch.arange(p, device=ids.device), tree.position_ids(p, ids.device)])[None],
            attention_mask=mask.to(self.device)[None, None],
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=n,
        )
        check_cache(self.cache)
        self.prefix_len = p
        return out.logits[0]

    def _mask_dtype(self) -> torch.dtype:
        return self.model.dtype if self.model.dtype.is_floating_point else torch.float32

    def verify(self, tree: TokenTree) -> torch.Tensor:
        dtype = self._mask_dtype()
        out = self.model(
            input_ids=tree.token_tensor(self.device)[None],
            position_ids=tree.position_ids(self.prefix_len, self.device)[None],
            attention_mask=tree.attention_mask(self.prefix_len, dtype=dtype, device=self.device),
            past_key_values=self.cache,
            use_cache=True,
        )
        return out.logits[0]

    def commit(self, nodes: list[int]) -> None:
        keep_positions(self.cache, self.prefix_len, nodes)
        self.prefix_len += len(nodes)


def tree_generate(model: Any, input_ids: torch.Tensor, logits_processor: Any, stopping_criteria: Any,
                  generation_config: Any, synced_gpus: bool = False, streamer: Any = None,
                  draft_tree: Any = None, corpus_tokenizer: Any = None, **model_kwargs: Any) -> Any:
    """``custom_generate``-compatible decoding loop with tree speculation (batch size 1).

    Args (beyond what ``generate`` passes):
        draft_tree: a :class:`tokenprune.DraftTree` (default: ``DraftTree()``, n-gram + recycling,
            automatic budget). Its speculator (recycling table, latency model) persists across calls.
        corpus_tokenizer: encodes string entries of the retrieval corpus (``generate`` consumes
            ``tokenizer=`` itself and does not forward it to a custom decoding function).

    Returns ``[1, L + new]`` ids, or a ``GenerateDecoderOnlyOutput`` (sequences and cache) when
    ``return_dict_in_generate=True``. Statistics of the call: ``draft_tree.speculator(model=model).stats``.
    """
    from tokenprune.methods.draft_tree import DraftTree

    check_model(model)
    if draft_tree is None:
        draft_tree = DraftTree()
    if not isinstance(draft_tree, DraftTree):
        raise TypeError(f"draft_tree must be a tokenprune.DraftTree, got {type(draft_tree).__name__}")
    if input_ids.shape[0] != 1:
        raise ValueError(
            f"DraftTree speculative decoding supports batch size 1 only (rows accept different numbers of "
            f"tokens per step); got batch size {input_ids.shape[0]}. Call generate once per prompt."
        )
    if synced_gpus:
        raise NotImplementedError("DraftTree does not support synced_gpus")
    if streamer is not None:
        raise NotImplementedError("DraftTree does not support streamers yet")
    if generation_config.return_dict_in_generate:
        asked = [name for name in _UNSUPPORTED_OUTPUTS if getattr(generation_config, name, False)]
        if asked:
            raise NotImplementedError(f"DraftTree returns sequences and the cache only; unsupported: {', '.join(asked)}")
    mask = model_kwargs.get("attention_mask")
    if mask is not None and not bool((mask == 1).all()):
        raise ValueError("DraftTree needs an unpadded prompt (attention_mask all ones) at batch size 1")
    cache = model_kwargs.get("past_key_values")
    if cache is None:
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config)
    if cache.get_seq_length() != 0:
        raise ValueError("DraftTree starts from an empty cache; continuing from past_key_values is not supported")

    # One speculator per target model (its recycling table holds token ids of this vocabulary).
    speculator = draft_tree.speculator(corpus_tokenizer, model=model)
    speculator.check_vocab(model.get_input_embeddings().num_embeddings)
    target = HFTarget(model, cache)
    sequences = speculative_generate(
        target,
        speculator,
        input_ids,
        process=logits_processor if len(logits_processor) else None,
        stop=lambda ids: bool(stopping_criteria(ids, None).any()),
        do_sample=bool(generation_config.do_sample),
        max_length=generation_config.max_length,
        latency_key=id(model),
    )
    # A stop inside an accepted path (EOS) leaves KV of tokens that were never emitted: drop it, so
    # the cache holds exactly the sequence minus its last token, as after plain decoding.
    if cache.get_seq_length() > sequences.shape[1] - 1:
        keep_positions(cache, sequences.shape[1] - 1, [])
    if generation_config.return_dict_in_generate:
        from transformers.generation.utils import GenerateDecoderOnlyOutput

        return GenerateDecoderOnlyOutput(sequences=sequences, past_key_values=cache)
    return sequences


def patch_model(model: Any, method: Any) -> PatchHandle:
    """Make ``model.generate`` decode with ``method`` (a DraftTree); reversible via the handle."""
    check_model(model)

    def apply(handle: PatchHandle) -> None:
        original = type(model).generate

        @functools.wraps(original)
        def generate(*args: Any, **kwargs: Any) -> Any:
            if "custom_generate" in kwargs:
                raise ValueError("generate is patched by tokenprune.DraftTree; do not pass custom_generate")
            call = handle.stats.new_call()
            out = original(model, *args, custom_generate=tree_generate, draft_tree=method, **kwargs)
            stats = method.speculator(model=model).stats
            for before, after in zip(stats.candidates, stats.verified):
                handle.stats.add(call=call, row=0, before=before, after=after, kind="speculative")
            handle.spec_stats = stats
            return out

        handle.set_attr(model, "generate", generate)

    return install(model, method, apply)
