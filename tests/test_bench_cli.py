"""tokenprune-bench: measurement primitives, result rows, presets and the CLI on the tiny preset."""

import json
import os
import statistics
import sys
from pathlib import Path

import pytest
import torch

from tokenprune.bench import cli, modes
from tokenprune.bench.results import Samples, ideal_ratio, variant_rows
from tokenprune.bench.timing import Run, TokenClock, interleaved_schedule, paired_ratios, summarize

pytest.importorskip("transformers")
pytest.importorskip("rich")

ROW_FIELDS = {
    "method", "label", "keep", "params", "ttft_ms", "ttft_ms_q1", "ttft_ms_q3", "ttft_ms_min", "ttft_ms_max",
    "ttft_ms_baseline", "speedup", "decode_tok_s", "e2e_ms", "visual_tokens_before", "visual_tokens_after",
    "prompt_tokens", "prompt_tokens_after", "ideal_ratio", "ratio_to_ideal", "new_tokens", "batch_size", "model",
    "num_parameters", "random_weights", "device", "reps", "warmup",
}
META_FIELDS = {"date", "machine", "cpu", "device", "device_name", "torch", "transformers", "vllm", "tokenprune",
               "git_commit", "parameters", "command"}
# One thread: on a machine shared with other jobs, two-thread runs spend most of their time waiting
# on each other and timings stop following token counts.
FAST = ["--reps", "1", "--warmup", "0", "--new-tokens", "2", "--threads", "1", "--quiet"]


# ------------------------------------------------------------------------------- statistics
def test_interleaved_schedule_rotates_and_warms_up():
    sched = interleaved_schedule(["b", "x", "y"], reps=4, warmup=2)
    warm = [r for r in sched if r.warmup]
    assert [r.variant for r in warm] == ["b", "x", "y"] * 2
    measured = [r for r in sched if not r.warmup]
    rounds = [[r.variant for r in measured if r.rep == rep] for rep in range(4)]
    assert rounds == [["b", "x", "y"], ["x", "y", "b"], ["y", "b", "x"], ["b", "x", "y"]]
    # every variant measured once per repetition, and every slot taken by every variant in 3 rounds
    for variant in "bxy":
        assert sorted(r.rep for r in measured if r.variant == variant) == [0, 1, 2, 3]
        assert {rnd.index(variant) for rnd in rounds[:3]} == {0, 1, 2}
    # warm-up comes before any measured run
    assert sched.index(Run("y", 1, True)) < sched.index(Run("b", 0, False))


@pytest.mark.parametrize("kwargs", [dict(variants=[], reps=1), dict(variants=["a", "a"], reps=1),
                                    dict(variants=["a"], reps=0), dict(variants=["a"], reps=1, warmup=-1),
                                    dict(variants=["a"], reps=1.5)])
def test_interleaved_schedule_rejects_bad_input(kwargs):
    with pytest.raises(ValueError):
        interleaved_schedule(**kwargs)


@pytest.mark.parametrize("values", [[3.0], [5.0, 1.0], [4, 1, 3, 2], [9, 1, 7, 3, 5], [2.5, 10, 0.5, 7, 7, 1]])
def test_summarize_matches_statistics(values):
    s = summarize(values)
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else (values[0],) * 3
    assert s.median == pytest.approx(statistics.median(values))
    assert (s.q1, s.q3) == (pytest.approx(q1), pytest.approx(q3))
    assert (s.min, s.max, s.n) == (min(values), max(values), len(values))
    assert s.as_dict("t") == {"t": s.median, "t_q1": s.q1, "t_q3": s.q3, "t_min": s.min, "t_max": s.max}
    with pytest.raises(ValueError):
        summarize([])


def test_paired_ratios_pair_by_repetition():
    assert paired_ratios({0: 10.0, 1: 12.0, 2: 9.0}, {2: 3.0, 0: 5.0}) == [2.0, 3.0]


def test_token_clock_ttft_and_decode_rate(monkeypatch):
    now = iter([100.0, 100.5, 100.6, 100.7, 100.9])  # start, then 4 tokens (the prompt put is not timed)
    monkeypatch.setattr("tokenprune.bench.timing.time.perf_counter", lambda: next(now))
    clock = TokenClock()
    clock.start()
    for _ in range(5):
        clock.put(torch.zeros(1))
    assert clock.new_tokens == 4
    assert clock.ttft_s == pytest.approx(0.5)
    assert clock.decode_tokens_per_s(batch_size=2) == pytest.approx(2 * 3 / 0.4)


def test_token_clock_excludes_its_first_token_callback(monkeypatch):
    # start, token 1, (callback: reads 100.5 and 102.5, i.e. 2 s), end of callback, tokens 2 and 3
    now = iter([100.0, 100.5, 100.5, 102.5, 102.5, 102.7, 102.9])
    monkeypatch.setattr("tokenprune.bench.timing.time.perf_counter", lambda: next(now))
    calls = []

    def probe():
        calls.append(next(now))
        calls.append(next(now))
        return "kv"

    clock = TokenClock(on_first_token=probe)
    clock.start()
    for _ in range(4):
        clock.put(torch.zeros(1))
    assert calls == [100.5, 102.5] and clock.first_token_result == "kv"
    assert clock.token_times == pytest.approx([0.5, 0.7, 0.9])  # the 2 s callback is not counted
    assert clock.decode_tokens_per_s(1) == pytest.approx(2 / 0.4)


def test_stopwatch_and_time_interleaved(monkeypatch):
    from tokenprune.bench.timing import Stopwatch, time_interleaved

    wall = iter([10.0, 10.25])
    cpu = iter([3.0, 3.0625])
    monkeypatch.setattr("tokenprune.bench.timing.time.perf_counter", lambda: next(wall))
    monkeypatch.setattr("tokenprune.bench.timing.time.process_time", lambda: next(cpu))
    with Stopwatch() as watch:
        pass
    assert (watch.wall_s, watch.cpu_s) == (0.25, 0.0625)
    assert (watch.seconds("wall"), watch.seconds("cpu")) == (0.25, 0.0625)
    with pytest.raises(ValueError, match="clock"):
        watch.seconds("gpu")
    monkeypatch.undo()

    order = []
    summaries = time_interleaved({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, reps=3, warmup=1)
    assert order == ["a", "b", "a", "b", "b", "a", "a", "b"]  # warm-up, then rotating rounds
    assert summaries["a"].n == summaries["b"].n == 3 and summaries["a"].min >= 0
    with pytest.raises(ValueError, match="clock"):
        time_interleaved({"a": lambda: None}, reps=1, clock="gpu")


def test_ideal_ratio():
    assert ideal_ratio(100, 0, 4) == 1.0
    assert ideal_ratio(609, 512, 4) == pytest.approx(609 / 97)
    # FastV at K=2 of 4 layers: 2 layers full, 2 layers pruned
    assert ideal_ratio(609, 288, 4, first_pruned_layer=2) == pytest.approx(609 * 4 / (609 * 2 + 321 * 2))
    with pytest.raises(ValueError):
        ideal_ratio(10, 10, 4)


def test_variant_rows_speedups():
    import tokenprune as tp

    samples = Samples()
    for rep, (base, fast) in enumerate([(100.0, 25.0), (120.0, 40.0), (80.0, 40.0)]):
        samples.add("baseline", rep, ttft_ms=base, decode_tok_s=10.0, throughput_rps=1000 / base)
        samples.add("dp", rep, ttft_ms=fast, decode_tok_s=12.0 + rep, peak_mem_mb=None, throughput_rps=1000 / fast)
    rows = variant_rows(samples, [("baseline", None), ("dp", tp.DivPrune(keep=8))],
                        per_variant={"dp": {"ideal_ratio": 4.0}}, common={"model": "m"})
    base, dp = rows
    assert base["method"] == "baseline" and base["speedup"] == 1.0 and "speedup_q1" not in base
    assert dp["method"] == "divprune" and dp["keep"] == 8 and dp["params"]["keep"] == 8
    assert dp["ttft_ms"] == 40.0 and dp["ttft_ms_baseline"] == 100.0
    assert dp["speedup"] == pytest.approx(2.5)
    assert (dp["speedup_min"], dp["speedup_max"]) == (pytest.approx(2.0), pytest.approx(4.0))  # paired: 4, 3, 2
    assert dp["speedup_paired"] == pytest.approx(3.0)
    assert dp["decode_speedup"] == pytest.approx(1.3)  # higher is better: method / baseline
    assert (dp["decode_speedup_min"], dp["decode_speedup_max"]) == (pytest.approx(1.2), pytest.approx(1.4))
    # throughput = 1 / TTFT here: its speedup and paired spread are TTFT's
    assert dp["throughput_speedup"] == pytest.approx(dp["throughput_rps"] / dp["throughput_rps_baseline"])
    assert (dp["throughput_speedup_min"], dp["throughput_speedup_max"]) == (pytest.approx(2.0), pytest.approx(4.0))
    assert base["throughput_speedup"] == 1.0 and "throughput_speedup_q1" not in base
    assert dp["ratio_to_ideal"] == pytest.approx(2.5 / 4.0)
    assert "peak_mem_mb" not in dp and dp["model"] == "m"
    with pytest.raises(ValueError):
        variant_rows(samples, [("dp", tp.DivPrune(keep=8))])


def test_parse_methods():
    parsed = cli.parse_methods("divprune:keep=64, fastv:layer=3:keep=0.25")
    assert [label for label, _ in parsed] == ["divprune(keep=64)", "fastv(layer=3,keep=0.25)"]
    assert parsed[1][1].layer == 3 and parsed[1][1].keep == 0.25
    swept = cli.parse_methods("divprune,fastv:layer=2", keep=[128, 0.5])
    assert [(m.name, m.keep) for _, m in swept] == [("divprune", 128), ("divprune", 0.5), ("fastv", 128),
                                                     ("fastv", 0.5)]
    for bad in ("nope", "divprune:keep=0", "divprune:keep", "divprune:bogus=1", "divprune,divprune"):
        with pytest.raises(cli.UsageError):
            cli.parse_methods(bad)


# ------------------------------------------------------------------------------- presets
def test_gpu_presets_have_the_published_shapes():
    from tokenprune.bench.presets import PRESETS, count_parameters

    expected = {"llava-1.5-7b": 7.06e9, "qwen2.5-vl-7b": 8.29e9, "llama-3-8b": 8.03e9, "medium-llava": 1.4e8}
    for name, params in expected.items():
        preset = PRESETS[name]
        assert count_parameters(preset.make_config(None), preset.family) == pytest.approx(params, rel=0.02)
    assert all(PRESETS[n].gpu_only for n in ("llava-1.5-7b", "llava-next-7b", "qwen2.5-vl-7b", "llama-3-8b"))


# ------------------------------------------------------------------------------- CLI
def _run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_default_run_reports_divprune_576_to_64(tmp_path, capsys):
    path = tmp_path / "default.json"
    threads = torch.get_num_threads()
    # 3 interleaved repetitions after a warm-up: one cold or disturbed run cannot decide the speedup.
    code, _, err = _run(capsys, "--json", str(path), "--reps", "3", "--warmup", "1", "--new-tokens", "2", "--threads",
                        "1", "--quiet")
    assert torch.get_num_threads() == threads  # restored
    assert code == 0, err
    data = json.loads(path.read_text())
    assert META_FIELDS <= data["meta"].keys()
    assert data["meta"]["parameters"]["model"] == "tiny-llava"
    rows = {r["method"]: r for r in data["results"]}
    assert list(rows) == ["baseline", "divprune", "fastv"]
    for row in rows.values():
        assert ROW_FIELDS <= row.keys(), ROW_FIELDS - row.keys()
        assert row["new_tokens"] == 2 and row["reps"] == 3 and row["random_weights"] is True
    dp, fastv = rows["divprune"], rows["fastv"]
    assert (dp["keep"], dp["visual_tokens_before"], dp["visual_tokens_after"]) == (64, 576, 64)
    assert dp["prompt_tokens"] - dp["prompt_tokens_after"] == 512
    assert (fastv["params"]["layer"], fastv["visual_tokens_after"]) == (2, 288)
    assert rows["baseline"]["visual_tokens_after"] == 576
    assert dp["ttft_ms_baseline"] == rows["baseline"]["ttft_ms"]
    assert dp["speedup"] == pytest.approx(dp["ttft_ms_baseline"] / dp["ttft_ms"])
    assert dp["speedup"] > 1.0  # 576 -> 64 tokens: ~4x on this preset


def test_latency_table_csv_and_report(tmp_path, capsys):
    csv_path, png = tmp_path / "r.csv", tmp_path / "r.png"
    code, out, err = _run(capsys, "latency", "--image-size", "56", "--methods", "divprune:keep=4", "--reps", "2",
                          "--warmup", "1", "--new-tokens", "3", "--batch-size", "2", "--threads", "1",
                          "--csv", str(csv_path))
    assert code == 0, err
    assert "divprune(keep=4)" in out and "TTFT speedup" in out and "quality is meaningless" in out
    code, out, err = _run(capsys, "report", str(csv_path), "--plot", str(png), "--json", str(tmp_path / "r.json"))
    assert code == 0, err
    assert "divprune(keep=4)" in out and "4/16" in out
    assert png.stat().st_size > 1000
    rows = json.loads((tmp_path / "r.json").read_text())["results"]
    assert rows[1]["visual_tokens_after"] == 4 and rows[1]["reps"] == 2 and rows[1]["batch_size"] == 2
    assert (rows[1]["prompt_tokens"], rows[1]["prompt_tokens_after"]) == (1 + 32 + 16, 1 + 32 + 4)


def test_sweep_writes_plot_and_rows(tmp_path, capsys):
    png, path = tmp_path / "sweep.png", tmp_path / "sweep.json"
    code, _, err = _run(capsys, "sweep", "--image-size", "56", "--methods", "divprune,fastv:layer=1",
                        "--keep", "8,0.25", "--plot", str(png), "--json", str(path), *FAST)
    assert code == 0, err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
    rows = json.loads(path.read_text())["results"]
    assert [(r["method"], r["keep"], r["visual_tokens_after"]) for r in rows] == [
        ("baseline", None, 16), ("divprune", 8, 8), ("divprune", 0.25, 4), ("fastv", 8, 8), ("fastv", 0.25, 4)]


def test_models_lists_presets(capsys):
    code, out, _ = _run(capsys, "models")
    assert code == 0
    for name in ("tiny-llava", "medium-llava", "llava-1.5-7b", "llava-next-7b", "qwen2.5-vl-7b", "llama-3-8b"):
        assert name in out


@pytest.mark.parametrize("argv, message", [
    (["--model", "no-such-model"], "unknown model"),
    (["--methods", "nope"], "unknown method"),
    (["--methods", "divprune:keep=0"], "keep must be"),
    (["--methods", "divprune:keep=1.5"], "keep must be"),
    (["sweep", "--keep", "x"], "--keep"),
    (["--reps", "0"], "--reps"),
    (["--engine", "tgi"], "invalid choice"),
    (["--device", "tpu"], "device"),
    (["--image-size", "50", "--methods", "divprune:keep=4"], "image_size"),
    (["--methods", "fastv:layer=7:keep=4", "--image-size", "56"], "layer must be"),
    (["report", "/no/such/file.json"], "does not exist"),
] + ([] if torch.cuda.is_available() else [(["--model", "llava-1.5-7b"], "GPU")]))
def test_bad_input_exits_2_with_one_line(argv, message, capsys):
    code, out, err = _run(capsys, *argv, *(["--quiet"] if argv[0] == "report" else FAST))
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("tokenprune-bench: error:") and message in err
    assert "Traceback" not in err


def test_missing_engine_backend_exits_2(monkeypatch, capsys):
    monkeypatch.setitem(modes.BACKENDS, "vllm", ("tokenprune_no_such_backend",))
    code, _, err = _run(capsys, "--engine", "vllm", *FAST)
    assert code == 2 and "not installed" in err and err.count("\n") == 1
    monkeypatch.setitem(modes.RUNNERS, ("hf", "text"), "tokenprune_no_such_module:run")
    code, _, err = _run(capsys, "--mode", "text", "--methods", "divprune", *FAST)
    assert code == 2 and "unavailable" in err and err.count("\n") == 1
    monkeypatch.delitem(modes.DEFAULT_METHODS, "spec")
    code, _, err = _run(capsys, "--mode", "spec", *FAST)
    assert code == 2 and "--methods is required" in err


def test_runners_import_from_the_package_without_touching_sys_path(tmp_path):
    """Every runner of RUNNERS (and the quality harness) imports by package name, in a fresh
    interpreter, leaves sys.path as it found it, and a foreign top-level ``benchmarks`` package on
    the path (pysbd installs one) shadows nothing."""
    import subprocess

    fake = tmp_path / "benchmarks"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('the foreign benchmarks package was imported')\n")
    for name in ("text_bench", "vllm_bench", "kernels"):
        (fake / f"{name}.py").write_text("raise ImportError('a foreign benchmark module was imported')\n")
    code = (
        "import sys\n"
        f"sys.path.insert(0, {str(tmp_path)!r})\n"
        "before = list(sys.path)\n"
        "import importlib\n"
        "from tokenprune.bench import modes\n"
        "for ref in modes.RUNNERS.values():\n"
        "    module, _, attr = ref.partition(':')\n"
        "    runner = getattr(importlib.import_module(module), attr)\n"
        "    assert callable(runner) and runner.__module__ == module, ref\n"
        "    assert module.startswith('tokenprune.bench.suites.'), ref\n"
        "import tokenprune.bench.suites.quality.evaluate, tokenprune.bench.suites.kernels\n"
        "assert sys.path == before, set(sys.path) ^ set(before)\n"
        "assert 'benchmarks' not in sys.modules\n"
        "print('ok', len(modes.RUNNERS))\n"
    )
    root = str(Path(__file__).resolve().parents[1])  # this checkout's tokenprune, not an installed one
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["ok", str(len(modes.RUNNERS))]


def test_modes_are_pluggable(tmp_path, monkeypatch, capsys):
    """A runner registered for (engine, mode) receives the config and its rows are reported."""
    (tmp_path / "fake_bench_mode.py").write_text(
        "from tokenprune.bench.results import Samples, variant_rows\n"
        "def run(config, track):\n"
        "    s = Samples()\n"
        "    variants = [('baseline', None), *config.methods]\n"
        "    for run in track(__import__('tokenprune.bench.timing', fromlist=['x']).interleaved_schedule(\n"
        "            [v for v, _ in variants], config.reps, config.warmup), 'fake'):\n"
        "        s.add(run.variant, run.rep, ttft_ms=100.0 if run.variant == 'baseline' else 50.0)\n"
        "    return variant_rows(s, variants, common={'model': config.model, 'prompt_tokens': config.prompt_tokens})\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(modes.RUNNERS, ("hf", "text"), "fake_bench_mode:run")
    path = tmp_path / "text.json"
    code, _, err = _run(capsys, "--mode", "text", "--methods", "divprune:keep=4,fastv", "--prompt-tokens", "4096",
                        "--json", str(path), *FAST)
    assert code == 0, err
    data = json.loads(path.read_text())
    assert data["meta"]["parameters"]["mode"] == "text"
    assert [r["speedup"] for r in data["results"]] == [1.0, 2.0, 2.0]
    assert data["results"][0]["prompt_tokens"] == 4096
    sys.modules.pop("fake_bench_mode", None)


def test_checkpoint_path_is_accepted(tiny_llava_path, tmp_path, capsys):
    path = tmp_path / "ckpt.json"
    code, _, err = _run(capsys, "--model", str(tiny_llava_path), "--methods", "divprune:keep=4", "--json", str(path),
                        *FAST)
    assert code == 0, err
    rows = json.loads(path.read_text())["results"]
    assert rows[0]["random_weights"] is False and rows[0]["model"] == str(tiny_llava_path)
    assert (rows[1]["visual_tokens_before"], rows[1]["visual_tokens_after"]) == (16, 4)


def test_input_builders_fit_llava_next_and_qwen2_5_vl():
    """The GPU presets' families: inputs built for tiny configs of the same classes generate."""
    import transformers
    from transformers import CLIPVisionConfig, LlavaNextConfig, Qwen2_5_VLConfig

    from tokenprune.bench.suites.hf_visual import INPUT_BUILDERS
    from tokenprune.bench.presets import LoadedModel
    from tokenprune.fixtures import tiny_llama_config

    torch.manual_seed(0)
    clip = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            image_size=56, patch_size=14, projection_dim=32)
    next_cfg = LlavaNextConfig(vision_config=clip, text_config=tiny_llama_config(hidden_size=64, num_layers=2),
                               image_token_id=4, image_grid_pinpoints=[[56, 112], [112, 56], [112, 112]],
                               vision_feature_layer=-2, vision_feature_select_strategy="default")
    qwen_cfg = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, bos_token_id=None, eos_token_id=None,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [8, 4, 4]}),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           window_size=56, fullatt_block_indexes=[1]),
        image_token_id=502, vision_start_token_id=500, vision_end_token_id=501, video_token_id=503)
    for family, config, image_id, expected in [("llava_next", next_cfg, 4, 16 + 4 * 16 + 8),
                                               ("qwen2_5_vl", qwen_cfg, 502, (112 // 28) ** 2)]:
        model = getattr(transformers, {"llava_next": "LlavaNextForConditionalGeneration",
                                       "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"}[family])(config).eval()
        lm = LoadedModel(model, family, family, True, torch.device("cpu"), torch.float32, 112)
        inputs = INPUT_BUILDERS[family](lm, 2, 8)
        assert ((inputs["input_ids"] == image_id).sum(dim=1) == expected).all()
        out = model.generate(**inputs, max_new_tokens=2, min_new_tokens=2, do_sample=False, pad_token_id=0)
        assert out.shape == (2, inputs["input_ids"].shape[1] + 2)


def test_plot_tolerates_ratio_of_medians_outside_paired_iqr(tmp_path):
    from tokenprune.bench.report import plot_results

    rows = [{"method": "baseline", "speedup": 1.0, "model": "m"},
            {"method": "divprune", "keep": 64, "visual_tokens_after": 64, "speedup": 3.0, "speedup_q1": 3.2,
             "speedup_q3": 3.5, "ideal_ratio": 6.0, "quality": 0.5},
            {"method": "divprune", "keep": 128, "visual_tokens_after": 128, "speedup": 2.0, "ideal_ratio": 3.5}]
    plot_results(rows, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000
    with pytest.raises(ValueError):
        plot_results(rows[:1], tmp_path / "q.png")


def test_suite_runners_pass_the_config(monkeypatch, tmp_path, capsys):
    """--engine vllm and --mode text hand the config to their suites' entry points and report their rows."""
    import tokenprune as tp
    from tokenprune.bench.suites import text, vllm_visual

    calls = {}

    def fake_rows(labels):
        samples = Samples()
        for rep in range(2):
            for (label, _), ttft in zip(labels, [400.0, 100.0]):
                samples.add(label, rep, ttft_ms=ttft)
        return variant_rows(samples, labels)

    def run_vllm_benchmark(presets, method, trials, batch, max_tokens, warmup, track, keep=None):
        calls["vllm"] = dict(presets=presets, method=method.to_config(), trials=trials, batch=batch, warmup=warmup)
        return fake_rows([("baseline", None), (method.name, method)])

    def run_text_benchmark(preset="tiny", lengths=None, methods=None, reps=3, new_tokens=None, warmup=0, track=None,
                           **kw):
        calls["text"] = dict(preset=preset, lengths=lengths, labels=[label for label, _ in methods], reps=reps,
                             warmup=warmup, new_tokens=new_tokens)
        return fake_rows(methods)

    monkeypatch.setitem(modes.BACKENDS, "vllm", ())
    monkeypatch.setattr(vllm_visual, "run_vllm_benchmark", run_vllm_benchmark)
    monkeypatch.setattr(text, "run_text_benchmark", run_text_benchmark)
    monkeypatch.setattr(text, "PRESETS", {"tiny": {}})
    path = tmp_path / "v.json"
    code, _, err = _run(capsys, "--engine", "vllm", "--methods", "divprune:keep=64", "--reps", "3", "--batch-size",
                        "2", "--warmup", "0", "--json", str(path), "--quiet")
    assert code == 0, err
    assert calls["vllm"] == dict(presets=["tiny"], method=tp.DivPrune(keep=64).to_config(), trials=3,
                                 batch=2, warmup=0)
    base, dp = json.loads(path.read_text())["results"]
    assert (dp["label"], dp["ttft_ms"], dp["ttft_ms_baseline"], dp["speedup"]) == ("divprune(keep=64)", 100.0, 400.0,
                                                                                   4.0)
    code, _, err = _run(capsys, "--engine", "vllm", "--methods", "fastv", "--quiet")
    assert code == 2 and "visual methods" in err

    path = tmp_path / "t.json"
    code, _, err = _run(capsys, "--mode", "text", "--model", "tiny", "--methods", "divprune:keep=4",
                        "--prompt-tokens", "512", "--new-tokens", "4", "--json", str(path), "--quiet")
    assert code == 0, err
    assert calls["text"] == dict(preset="tiny", lengths=[512], labels=["baseline", "divprune(keep=4)"], reps=5,
                                 warmup=1, new_tokens=4)
    base, dp = json.loads(path.read_text())["results"]
    assert (dp["method"], dp["label"], dp["model"], dp["speedup"]) == ("divprune", "divprune(keep=4)", "tiny", 4.0)


def test_threads_auto_drops_to_one_on_a_busy_machine(monkeypatch):
    monkeypatch.setattr(cli.os, "getloadavg", lambda: (64.0, 0.0, 0.0))
    assert cli._resolve_threads("auto") == 1
    monkeypatch.setattr(cli.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert cli._resolve_threads("auto") == torch.get_num_threads()
    assert cli._resolve_threads(3) == 3
