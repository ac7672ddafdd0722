"""The text benchmark runs end to end on the tiny preset and reports consistent rows."""

import pytest

import tokenprune as tp

pytest.importorskip("transformers")


def test_run_text_benchmark_tiny():
    from tokenprune.bench.suites.text import run_text_benchmark

    methods = [("baseline", None), ("lazyllm", tp.LazyLLM(schedule=((1, 0.5), (2, 0.25)), window=4)),
               ("snapkv", tp.SnapKV(keep=0.5, window=8)), ("keep-all", tp.LazyLLM(schedule=((1, 1.0),)))]
    rows = run_text_benchmark("tiny", lengths=(96,), methods=methods, reps=2, new_tokens=3)
    by = {r["label"]: r for r in rows}
    assert list(by) == ["baseline", "lazyllm", "snapkv", "keep-all"]
    assert [r["method"] for r in rows] == ["baseline", "lazyllm", "snapkv", "lazyllm"]
    assert by["baseline"]["speedup"] == 1.0 and by["baseline"]["kv_ratio"] == 1.0
    # KV after prefill: LazyLLM layers hold 96, 48, 24, 24 tokens; SnapKV 48 per layer.
    assert by["lazyllm"]["kv_ratio"] == pytest.approx((96 + 48 + 24 + 24) / (4 * 96))
    assert by["snapkv"]["kv_ratio"] == 0.5
    assert by["lazyllm"]["aux_bytes"] == (48 + 24) * 128 * 4  # hidden states parked at layers 1 and 2
    # SnapKV prefills unpruned: its first token is the baseline's; keep-all is the baseline.
    for name in ("snapkv", "keep-all"):
        assert by[name]["kl"] == 0.0 and by[name]["next_token_agreement"] == 1.0
    assert by["keep-all"]["sequence_agreement"] == 1.0
    assert by["lazyllm"]["kl"] > 0
    for row in rows:  # the columns of every tokenprune-bench mode
        assert row["ttft_ms"] > 0 and row["decode_tok_s"] > 0 and row["e2e_ms"] > row["ttft_ms"]
        assert row["mode"] == "text" and row["prompt_tokens"] == 96 and row["reps"] == 2
        assert row["speedup"] == pytest.approx(row["ttft_ms_baseline"] / row["ttft_ms"])
    assert by["snapkv"]["params"] == tp.SnapKV(keep=0.5, window=8).to_config()
    assert by["snapkv"]["speedup_min"] <= by["snapkv"]["speedup_paired"] <= by["snapkv"]["speedup_max"]
