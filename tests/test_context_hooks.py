"""Context pruning hooks: HF ``apply_chat_template(documents=)`` patching/restoring, ``tp.prune``,
the plain helpers, and vLLM's ``LLM.chat(chat_template_kwargs={"documents": ...})``."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import pytest  # noqa: E402

import tokenprune as tp  # noqa: E402
from tokenprune.integrations.chat import prune_documents, question_from_messages  # noqa: E402

from test_context_pruner import KeywordScorer  # noqa: E402

TEMPLATE = (
    "{% if documents %}{% for doc in documents %}DOCUMENT {{ loop.index }}: "
    "{% if doc is mapping %}{{ doc.title }}\n{{ doc.text }}{% else %}{{ doc }}{% endif %}\n{% endfor %}{% endif %}"
    "{% for message in messages %}{{ message['role'].upper() }}: "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% endif %}\n{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
DOCS = [
    {"title": "Acme", "text": "Acme sells anvils. Acme was founded in 1875. The U.S. office is in Ohio."},
    {"title": "Beta", "text": "Beta makes cars. Beta was founded in 1990."},
]
MESSAGES = [{"role": "system", "content": "Answer from the documents."},
            {"role": "user", "content": "Where is the Beta office?"},
            {"role": "assistant", "content": "I do not know."},
            {"role": "user", "content": [{"type": "text", "text": "When was acme founded"}]}]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from tokenprune.methods.context.scorers.bi_encoder import default_model_path

    tok = AutoTokenizer.from_pretrained(default_model_path())
    tok.chat_template = TEMPLATE
    return tok


def pruner(**kw):
    return tp.ContextPruner(scorer=KeywordScorer(), always_keep_title=False, **kw)


def render(tok, documents, messages=MESSAGES, **kw):
    return tok.apply_chat_template(messages, documents=documents, tokenize=False, add_generation_prompt=True, **kw)


def test_question_is_the_last_user_message():
    assert question_from_messages(MESSAGES) == "When was acme founded"
    assert question_from_messages("plain question") == "plain question"
    with pytest.raises(ValueError, match="user message"):
        question_from_messages([{"role": "system", "content": "hi"}])


def test_patch_prunes_documents_and_restores_exactly(tokenizer):
    p = pruner(threshold=0.5)
    expected_docs = prune_documents(p, MESSAGES, DOCS)
    assert expected_docs == [{"title": "Acme", "text": "Acme was founded in 1875."},
                             {"title": "Beta", "text": "Beta was founded in 1990."}]
    unpatched = render(tokenizer, DOCS)
    assert "apply_chat_template" not in tokenizer.__dict__
    with tp.patch(tokenizer, p) as handle:
        assert "apply_chat_template" in tokenizer.__dict__
        prompt = render(tokenizer, DOCS)
        ids = tokenizer.apply_chat_template(MESSAGES, documents=DOCS, add_generation_prompt=True)
    assert prompt == render(tokenizer, expected_docs)
    assert "anvils" in unpatched and "anvils" not in prompt
    assert ids["input_ids"] == tokenizer.apply_chat_template(
        MESSAGES, documents=expected_docs, add_generation_prompt=True
    )["input_ids"]
    records = handle.stats.last()
    assert [r.image for r in records] == [0, 1] and all(r.kind == "context" for r in records)
    assert all(r.after < r.before for r in records)
    assert "apply_chat_template" not in tokenizer.__dict__  # restored: the class method again
    assert render(tokenizer, DOCS) == unpatched


def test_threshold_zero_and_no_documents_leave_the_prompt_unchanged(tokenizer):
    unpatched, bare = render(tokenizer, DOCS), render(tokenizer, None)
    with tp.patch(tokenizer, pruner(threshold=0.0)):
        assert render(tokenizer, DOCS) == unpatched
    with tp.patch(tokenizer, pruner(threshold=0.9)):
        assert render(tokenizer, None) == bare


def test_prune_decorator_on_the_method_and_on_a_function(tokenizer):
    p = pruner(threshold=0.5)
    expected = render(tokenizer, prune_documents(p, MESSAGES, DOCS))
    wrapped = tp.prune(p)(tokenizer.apply_chat_template)
    assert wrapped(MESSAGES, documents=DOCS, tokenize=False, add_generation_prompt=True) == expected

    @tp.prune(p)
    def build_prompt(tok, documents):
        return render(tok, documents)

    assert build_prompt(tokenizer, DOCS) == expected
    assert build_prompt.last_stats.calls == 1
    assert "apply_chat_template" not in tokenizer.__dict__


def test_batched_conversations(tokenizer):
    p = pruner(threshold=0.5)
    convs = [MESSAGES, [{"role": "user", "content": "what does beta make"}]]
    with tp.patch(tokenizer, p):
        prompts = tokenizer.apply_chat_template(convs, documents=DOCS, tokenize=False, add_generation_prompt=True)
        with pytest.raises(NotImplementedError, match="tokenize=False"):
            tokenizer.apply_chat_template(convs, documents=DOCS, add_generation_prompt=True)
    assert prompts[0] == render(tokenizer, prune_documents(p, MESSAGES, DOCS))
    assert prompts[1] == render(tokenizer, prune_documents(p, "what does beta make", DOCS), messages=convs[1])


def test_patch_rejects_wrong_targets_and_methods(tokenizer):
    with pytest.raises(NotImplementedError, match="apply_chat_template"):
        tp.patch(object(), pruner())
    with pytest.raises(TypeError):
        prune_documents(tp.DivPrune(keep=4), MESSAGES, DOCS)


# ------------------------------------------------------------------ vLLM front end


@pytest.fixture(scope="module")
def tiny_vllm_llama(tmp_path_factory, tokenizer):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("vllm-llama")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                         initializer_range=0.3, bos_token_id=101, eos_token_id=102, pad_token_id=0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.mark.vllm
def test_vllm_chat_documents_are_pruned(tiny_vllm_llama):
    vllm = pytest.importorskip("vllm")
    from tokenprune.integrations.chat import prune_chat_template_kwargs

    llm = vllm.LLM(model=tiny_vllm_llama, dtype="float32", max_model_len=512, enforce_eager=True, seed=0,
                   # An explicit KV budget: vLLM-CPU otherwise sizes the cache as a fraction of RAM minus
                   # this process's RSS, which a long pytest session (many models loaded) can exceed.
                   kv_cache_memory_bytes=64 << 20)
    params = vllm.SamplingParams(max_tokens=4, temperature=0.0)
    p = pruner(threshold=0.5)
    kwargs = {"documents": DOCS}
    pruned_kwargs = prune_chat_template_kwargs(p, MESSAGES, kwargs)
    assert pruned_kwargs["documents"] == prune_documents(p, MESSAGES, DOCS) and kwargs["documents"] is DOCS
    reference = llm.chat(MESSAGES, params, chat_template_kwargs=pruned_kwargs, use_tqdm=False)[0]
    full = llm.chat(MESSAGES, params, chat_template_kwargs=kwargs, use_tqdm=False)[0]
    with tp.patch(llm, p) as handle:
        patched = llm.chat(MESSAGES, params, chat_template_kwargs=kwargs, use_tqdm=False)[0]
        batch = llm.chat([MESSAGES, MESSAGES], params, chat_template_kwargs=kwargs, use_tqdm=False)
    assert "chat" not in llm.__dict__
    assert patched.prompt_token_ids == reference.prompt_token_ids
    assert len(patched.prompt_token_ids) < len(full.prompt_token_ids)
    assert patched.outputs[0].token_ids == reference.outputs[0].token_ids
    assert [o.prompt_token_ids for o in batch] == [reference.prompt_token_ids] * 2
    assert len(handle.stats.records) == 2 + 4
    # unpatched again: the full prompt
    assert llm.chat(MESSAGES, params, chat_template_kwargs=kwargs, use_tqdm=False)[0].prompt_token_ids == full.prompt_token_ids
