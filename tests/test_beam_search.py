"""Beam search with decoder-stage methods (issue 15.2): the decoder runtime's per-row state follows the
cache when generate reorders beams, so every returned beam's score is the patched model's own
log-probability of that sequence — checked by teacher-forcing each returned sequence through the
patched model one step at a time (plain generate, constrained to the beam's tokens)."""

import pytest
import torch

import tokenprune as tp
from causal_lm_utils import left_padded, load, prompt

transformers = pytest.importorskip("transformers")

NEW = 5
BEAMS = 3


def forced_logprob(model, ids, mask, tokens, **inputs):
    """Sum of the log-probabilities the (patched) model gives ``tokens`` after ``ids``, decoding one token
    per step with its cache, as generate does."""
    target = tokens.tolist()

    def allowed(batch_id, sequence):
        return [target[sequence.shape[0] - ids.shape[1]]]

    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=len(target), do_sample=False,
                         prefix_allowed_tokens_fn=allowed, output_logits=True, return_dict_in_generate=True, **inputs)
    assert out.sequences[0, ids.shape[1]:].tolist() == target
    logprobs = torch.log_softmax(torch.stack(out.logits)[:, 0].float(), -1)
    return float(logprobs[torch.arange(len(target)), tokens].sum())


def beams(model, ids, mask, **inputs):
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW, num_beams=BEAMS,
                          num_return_sequences=BEAMS, length_penalty=0.0, do_sample=False, output_scores=True,
                          return_dict_in_generate=True, **inputs)


METHODS = {
    "lazyllm_revive": lambda: tp.LazyLLM(schedule=((1, 0.6), (2, 0.3)), window=3, revive=True),
    "lazyllm_static": lambda: tp.LazyLLM(schedule=((1, 0.6), (2, 0.3)), window=3, revive=False),
    "snapkv": lambda: tp.SnapKV(keep=0.5, window=4),
    "knorm": lambda: tp.Knorm(keep=0.5),
}


@pytest.mark.parametrize("name", list(METHODS))
def test_beam_scores_are_the_patched_models_log_probs(tiny_llama_path, name):
    model = load(tiny_llama_path)
    rows = [prompt(1, 36, seed=11), prompt(1, 27, seed=12)]
    batch, mask = left_padded(rows)
    with torch.no_grad(), tp.patch(model, METHODS[name]()):
        out = beams(model, batch, mask)
        assert out.sequences.shape[0] == 2 * BEAMS
        for i in range(2 * BEAMS):
            ids = rows[i // BEAMS]
            expected = forced_logprob(model, ids, torch.ones_like(ids), out.sequences[i, 36:])
            assert float(out.sequences_scores[i]) == pytest.approx(expected, abs=2e-4), (name, i)


def test_fastv_beam_scores_are_the_patched_models_log_probs(tiny_llava_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from tokenprune.fixtures import make_image

    processor = AutoProcessor.from_pretrained(tiny_llava_path)
    model = LlavaForConditionalGeneration.from_pretrained(tiny_llava_path).eval()
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what"}]}],
                                         add_generation_prompt=True)
    inputs = processor(images=[make_image(56, seed=3)], text=[text], return_tensors="pt")
    ids, mask = inputs.pop("input_ids"), inputs.pop("attention_mask")
    with torch.no_grad(), tp.patch(model, tp.FastV(layer=2, keep=4, impl="torch")):
        out = beams(model, ids, mask, **inputs)
        for i in range(BEAMS):
            expected = forced_logprob(model, ids, mask, out.sequences[i, ids.shape[1]:], **inputs)
            assert float(out.sequences_scores[i]) == pytest.approx(expected, abs=2e-4), i
