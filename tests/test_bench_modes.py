"""Smoke tests of the benchmark modes wired to the suites: spec (DraftTree), rag (ContextPruner), vLLM.

Each runs the real suite through ``tokenprune-bench`` with tiny settings and checks the JSON rows
against what the settings imply (exactness of greedy speculative decoding, threshold 0 keeping
everything, token counts).
"""

from __future__ import annotations

import json

import pytest

from _vllm_support import vllm_env  # noqa: F401
from tokenprune.bench import cli, report

FAST = ["--reps", "1", "--warmup", "0", "--threads", "1", "--quiet"]


def _run(capsys, tmp_path, *argv):
    path = tmp_path / "out.json"
    code = cli.main([*argv, *FAST, "--json", str(path), "--csv", str(tmp_path / "out.csv")])
    _, err = capsys.readouterr()
    assert code == 0, err
    data = json.loads(path.read_text())
    assert (tmp_path / "out.csv").stat().st_size > 0
    return data["meta"], data["results"]


@pytest.fixture(scope="module")
def tiny_lm_path(tmp_path_factory):
    """A random 1-layer Llama over the spec suite's 64-token vocabulary."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                                         bos_token_id=None, eos_token_id=None, pad_token_id=None))
    path = tmp_path_factory.mktemp("spec_lm")
    model.save_pretrained(path)
    return path


def test_spec_mode_reports_forwards_and_prompt_lookup(tiny_lm_path, tmp_path, capsys):
    meta, rows = _run(capsys, tmp_path, "--mode", "spec", "--model", str(tiny_lm_path), "--methods",
                      "draft_tree:sources=ngram:budget=4", "--new-tokens", "12", "--samples", "1")
    assert meta["parameters"]["mode"] == "spec" and meta["parameters"]["extra"] == {"samples": 1}
    assert {r["prompt_kind"] for r in rows} == {"repeat", "code", "prose"}
    assert [r["label"] for r in rows[:3]] == ["baseline", "hf-prompt-lookup-10", "draft_tree(sources=ngram,budget=4)"]
    for row in rows:
        assert row["mode"] == "spec" and row["decoding"] == "greedy" and row["new_tokens"] == 12
        assert row["tokens_per_forward"] * row["forwards_per_token"] == pytest.approx(1.0)
        assert row["e2e_ms"] > 0 and row["e2e_speedup"] == pytest.approx(row["e2e_ms_baseline"] / row["e2e_ms"])
        assert row["identical"] is True  # greedy speculative decoding is lossless
    for row in rows:
        if row["method"] == "baseline":
            assert row["tokens_per_forward"] == 1.0 and row["e2e_speedup"] == 1.0
        elif row["method"] == "draft_tree":
            assert row["source"] == "ngram" and row["budget"] == 4 and row["params"]["budget"] == 4
            # at most budget + 1 tokens per verification forward
            assert 1.0 <= row["tokens_per_forward"] <= 5.0
        else:
            assert row["method"] == "prompt_lookup" and row["budget"] == 10
    _, from_csv = report.load_results(tmp_path / "out.csv")  # booleans survive the CSV round trip
    assert [r["identical"] for r in from_csv] == [True] * len(rows) and from_csv[0]["random_weights"] is False


def test_spec_and_rag_modes_refuse_what_they_cannot_measure(capsys):
    assert cli.main(["--mode", "spec", "--methods", "divprune", *FAST]) == 2
    assert "speculative methods" in capsys.readouterr().err
    assert cli.main(["--mode", "rag", "--batch-size", "4", *FAST]) == 2
    assert "drop --batch-size" in capsys.readouterr().err


def test_rag_mode_recall_compression_and_ttft(tmp_path, capsys):
    meta, rows = _run(capsys, tmp_path, "--mode", "rag", "--model", "tiny", "--samples", "2", "--methods",
                      "context:threshold=0,context:threshold=0.99")
    assert meta["parameters"]["mode"] == "rag"
    assert [r["label"] for r in rows] == ["baseline", "context(threshold=0)", "context(threshold=0.99)"]
    base, keep_all, strict = rows
    for row in rows:
        assert row["mode"] == "rag" and row["questions"] == 2 and row["ttft_ms"] > 0
        assert row["prompt_tokens"] == base["prompt_tokens_after"] > 0
    assert base["speedup"] == 1.0 and base["token_compression"] == 0.0 and base["prune_ms_per_passage"] is None
    # threshold 0 keeps every sentence: the whole prompt, all answers
    assert keep_all["gold_sentence_recall"] == 1.0 and keep_all["token_compression"] == pytest.approx(0.0, abs=1e-9)
    assert keep_all["prompt_tokens_after"] == base["prompt_tokens"]
    # a near-1 threshold keeps min_sentences per passage: far shorter prompts
    assert strict["token_compression"] > 0.5 and strict["prompt_tokens_after"] < base["prompt_tokens"] / 2
    assert strict["prune_ms_per_passage"] > 0 and strict["ttft_with_pruning_ms"] > strict["ttft_ms"]
    assert strict["threshold"] == 0.99 and strict["scorer"] == "bi-encoder"


@pytest.mark.vllm
def test_vllm_engine_runs_the_suite(vllm_env, tmp_path):  # noqa: F811
    # No capsys: vLLM binds its log handler to the sys.stderr of its first import, which capsys
    # closes after the test (later vLLM logging would fail).
    path = tmp_path / "out.json"
    assert cli.main(["--engine", "vllm", "--methods", "divprune:keep=64", "--new-tokens", "2", *FAST,
                     "--json", str(path)]) == 0
    data = json.loads(path.read_text())
    meta, rows = data["meta"], data["results"]
    assert meta["parameters"]["engine"] == "vllm"
    base, pruned = rows
    assert base["method"] == "baseline" and pruned["method"] == "divprune" and pruned["keep"] == 64
    # 576 placeholder tokens per image become 64
    assert base["prompt_tokens_after"] - pruned["prompt_tokens_after"] == 512
    assert pruned["ideal_ratio"] == pytest.approx(base["prompt_tokens"] / pruned["prompt_tokens_after"])
    assert pruned["ttft_ms"] > 0 and pruned["speedup"] > 0 and pruned["throughput_rps"] > 0
    assert pruned["ttft_cpu_ms"] > 0 and pruned["throughput_cpu_speedup"] > 0 and pruned["label"] == "divprune(keep=64)"
    assert base["speedup"] == 1.0 and base["throughput_speedup"] == 1.0


def test_quality_subcommand_reports_retention(tmp_path, capsys):
    path, plot = tmp_path / "q.json", tmp_path / "q.png"
    code = cli.main(["quality", "--methods", "divprune", "--keep", "576,32", "--samples", "16", "--quiet",
                     "--json", str(path), "--plot", str(plot)])
    assert code == 0, capsys.readouterr().err
    data = json.loads(path.read_text())
    assert data["meta"]["subcommand"] == "quality" and data["meta"]["parameters"]["keep"] == [576, 32]
    rows = data["results"]
    assert [(r["method"], r["keep"]) for r in rows] == [("none", 576), ("divprune", 576), ("divprune", 32),
                                                        ("random", 576), ("random", 32)]
    base = rows[0]
    assert base["retention"] == 1.0 and base["agreement"] == 1.0
    for row in rows[1:]:
        assert row["retention"] == pytest.approx(row["accuracy"] / base["accuracy"])
    # keep-all selects every token: the unpruned model's answers
    assert all(r["agreement"] == 1.0 and r["accuracy"] == base["accuracy"] for r in rows if r["keep"] == 576)
    assert plot.stat().st_size > 0
    assert cli.main(["quality", "--methods", "snapkv,nosuch", "--quiet"]) == 2
    assert "--methods must be names among" in capsys.readouterr().err


def test_text_mode_runs_the_suite(tmp_path, capsys):
    meta, rows = _run(capsys, tmp_path, "--mode", "text", "--model", "tiny", "--prompt-tokens", "64", "--new-tokens",
                      "2", "--methods", "lazyllm,snapkv:keep=0.5")
    assert meta["parameters"]["mode"] == "text"
    assert [r["label"] for r in rows] == ["baseline", "lazyllm", "snapkv(keep=0.5)"]
    base, _, snapkv = rows
    assert all(r["prompt_tokens"] == 64 and r["model"] == "tiny" and r["ttft_ms"] > 0 for r in rows)
    # the baseline is its own reference
    assert base["speedup"] == 1.0 and base["kl"] == 0.0 and base["next_token_agreement"] == 1.0
    assert snapkv["method"] == "snapkv" and snapkv["params"]["keep"] == 0.5
    assert snapkv["kv_ratio"] < 0.75  # half the prompt's KV (plus the observation window) is kept
