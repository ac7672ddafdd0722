"""LLMLingua / LongLLMLingua on the same synthetic RAG set, in their own environment.

llmlingua pins an older transformers, so it runs in a separate venv (see docs/context_pruning.md),
from the root of a checkout (``-m`` puts the working directory on the path; from this package it
needs torch only: the stdlib-only :mod:`~tokenprune.bench.suites.rag.dataset`, the timing and the
report writer):

    python3 -m venv /tmp/llmlingua_venv
    /tmp/llmlingua_venv/bin/pip install torch==2.13.0 llmlingua "transformers<4.50"
    /tmp/llmlingua_venv/bin/python -m tokenprune.bench.suites.rag.llmlingua_side \
        --out benchmarks/results/rag_llmlingua.json --force

Offline adaptations, both outside llmlingua's code:

* ``PromptCompressor.__init__`` calls ``tiktoken.encoding_for_model("gpt-3.5-turbo")``, which
  downloads a BPE file: it is replaced by an encoder over the compressor model's own tokenizer
  (llmlingua uses it only to count tokens for its budgets).
* Its default compressor LM (Llama-2-7B) cannot be downloaded: a random LlamaForCausalLM with a
  byte-level BPE tokenizer trained on the benchmark's own text stands in. **Its perplexities are
  noise, so the recall figures only show what a compressor with uninformed scores keeps**; the
  compression ratio (set by ``rate``) and the latency of the machinery (for this tiny LM; a 7B
  LM costs far more) are meaningful.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch

from tokenprune.bench import report
from tokenprune.bench.suites.rag.dataset import make_split
from tokenprune.bench.timing import Stopwatch, summarize


def build_compressor_lm(path: str, corpus: list[str]) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=4000, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(fast), hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=4, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2,
                         pad_token_id=2)
    LlamaForCausalLM(config).save_pretrained(path)
    fast.save_pretrained(path)
    return path


class _TokenCounter:
    """Stands in for tiktoken's encoder: llmlingua only encodes/decodes to count tokens."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def encode(self, text, **_):
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids, **_):
        return self.tokenizer.decode(ids)


def main(argv=None):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-test", type=int, default=100)
    ap.add_argument("--rate", type=float, default=0.35, help="kept fraction (0.35 = 65%% compression)")
    ap.add_argument("--out", default="benchmarks/results/rag_llmlingua.json")
    report.add_force_argument(ap)
    args = ap.parse_args(argv)
    report.check_outputs_or_exit(ap, [("--out", args.out, "json")], force=args.force)

    import tiktoken
    import transformers

    test = make_split(1, args.n_test)
    corpus = [p["text"] for e in make_split(2, 200) for p in e.passages]  # tokenizer corpus: other entities
    with tempfile.TemporaryDirectory() as tmp:
        path = build_compressor_lm(os.path.join(tmp, "lm"), corpus)
        from transformers import AutoTokenizer

        counter = _TokenCounter(AutoTokenizer.from_pretrained(path))
        tiktoken.encoding_for_model = lambda name: counter  # offline stub (see module docstring)
        import llmlingua
        from llmlingua import PromptCompressor

        compressor = PromptCompressor(model_name=path, device_map="cpu", model_config={"trust_remote_code": False})
        settings = {
            "LongLLMLingua (question-aware)": dict(
                rate=args.rate, condition_in_question="after_condition", reorder_context="original",
                dynamic_context_compression_ratio=0.3, condition_compare=True, context_budget="+100",
                rank_method="longllmlingua"),
            "LLMLingua (question-agnostic)": dict(rate=args.rate),
        }
        rows = []
        for name, kw in settings.items():
            gold = answer = 0
            cb = ca = 0
            per_passage = []
            for e in test:
                texts = [p["text"] for p in e.passages]
                with Stopwatch() as watch:
                    out = compressor.compress_prompt(texts, instruction="", question=e.question,
                                                     concate_question=False, **kw)
                per_passage.append(1e3 * watch.wall_s / len(texts))
                prompt = out["compressed_prompt"]
                gold += e.gold_sentence in prompt
                answer += e.answer in prompt
                cb += len("\n\n".join(texts))
                ca += len(prompt)
            rows.append({"method": "llmlingua", "label": name, "mode": "rag", "rate": args.rate,
                         "gold_sentence_recall": gold / len(test), "answer_recall": answer / len(test),
                         "char_compression": 1 - ca / cb, **summarize(per_passage).as_dict("prune_ms_per_passage")})
            print(rows[-1], flush=True)
    meta = {**report.environment("cpu"), "transformers": transformers.__version__,
            "llmlingua": getattr(llmlingua, "__version__", "0.2.2"),
            "compressor_lm": "random LlamaForCausalLM hidden 256, 4 layers, BPE vocab 4000 (scores are noise)",
            "dataset": {"split": "test", "seed": 1, "questions": len(test)}, "parameters": vars(args)}
    report.write_json(args.out, meta, rows)


if __name__ == "__main__":
    main()
