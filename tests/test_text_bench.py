"""The text benchmark runs end to end on the tiny preset and reports consistent rows."""

import pytest

import tokenprune as tp

pytest.importorskip("transformers")


def test_run_text_benchmark_tiny():
    from tokenprune.bench.suites.text import run_text_benchmark

    methods = [("baseline", None), ("lazyllm", tp.LazyLLM(schedule=((1, 0.5), (2, 0.25)), window=4)),
               ("snapkv", tp.SnapKV(keep=0.5, window=8)), ("keep-all", tp.LazyLLM(schedule=((1, 1.0),)))]
    rows = run_text_benchmark("tiny", lengths=(96,), methods=methods, reps=1, new_tokens=3, progress=False)
    by = {r["method"]: r for r in rows}
    assert list(by) == ["baseline", "lazyllm", "snapkv", "keep-all"]
    assert by["baseline"]["ttft_speedup"] == 1.0 and by["baseline"]["kv_ratio"] == 1.0
    # KV after prefill: LazyLLM layers hold 96, 48, 24, 24 tokens; SnapKV 48 per layer.
    assert by["lazyllm"]["kv_ratio"] == pytest.approx((96 + 48 + 24 + 24) / (4 * 96))
    assert by["snapkv"]["kv_ratio"] == 0.5
    assert by["lazyllm"]["aux_bytes"] == (48 + 24) * 128 * 4  # hidden states parked at layers 1 and 2
    # SnapKV prefills unpruned: its first token is the baseline's; keep-all is the baseline.
    for name in ("snapkv", "keep-all"):
        assert by[name]["kl"] == 0.0 and by[name]["next_token_agreement"] == 1.0
    assert by["keep-all"]["sequence_agreement"] == 1.0
    assert by["lazyllm"]["kl"] > 0
    for row in rows:
        assert row["ttft_s"] > 0 and row["decode_tok_s"] > 0 and row["torch"] and row["date"]
