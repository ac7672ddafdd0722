"""Output files of tokenprune-bench and of the suites' own command lines: every output path is checked
before anything is measured (exit 2, one line naming the flag and the path), colliding outputs and
outputs equal to an input are refused, and an existing file is overwritten only with ``--force``.

The measurements are stubs that record their calls: a refusal must come before any of them runs.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from tokenprune.bench import cli, report
from tokenprune.bench.results import Samples, variant_rows

pytest.importorskip("transformers")
pytest.importorskip("rich")

FAST = ["--reps", "1", "--warmup", "0", "--new-tokens", "2", "--threads", "1", "--quiet"]
PRECIOUS = "precious results\n"


def _fake_rows(variants, **common):
    samples = Samples()
    for label, method in variants:
        samples.add(label, 0, ttft_ms=100.0 if method is None else 50.0)
    return variant_rows(samples, variants, common={"model": "stub", **common})


@pytest.fixture
def runner(monkeypatch):
    """The visual runner replaced by a stub; ``runner.calls`` lists the configs it measured."""
    from tokenprune.bench.suites import hf_visual

    calls = []

    def run(config, track):
        calls.append(config)
        return _fake_rows([("baseline", None), *config.methods], mode="visual")

    monkeypatch.setattr(hf_visual, "run", run)
    run.calls = calls
    return run


def _cli(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(err, *needles):
    assert err.count("\n") == 1 and err.startswith("tokenprune-bench: error:"), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, (needle, err)


# ------------------------------------------------------------------------------- the CLI
# case -> (flag, path under tmp_path (which holds a file "file.txt"), what the message says)
BAD_PATHS = {
    "directory": ("--json", lambda tmp: tmp, "is a directory"),
    "parent is a file": ("--csv", lambda tmp: tmp / "file.txt" / "r.csv", "not a directory"),
    "plot without an image extension": ("--plot", lambda tmp: tmp / "r.txt", "extension"),
    "plot without any extension": ("--plot", lambda tmp: tmp / "r", "extension"),
    "csv that report cannot read back": ("--csv", lambda tmp: tmp / "r.json", ".csv"),
    "json named like a csv": ("--json", lambda tmp: tmp / "r.csv", ".json"),
    "empty path": ("--json", lambda tmp: "", "empty path"),
}


@pytest.mark.parametrize("case", list(BAD_PATHS))
def test_bad_output_path_exits_2_before_measuring(case, runner, tmp_path, capsys):
    (tmp_path / "file.txt").write_text(PRECIOUS)
    flag, where, message = BAD_PATHS[case]
    path = str(where(tmp_path))
    code, _, err = _cli(capsys, "latency", flag, path, *FAST)
    assert code == 2, err
    _one_line_error(err, flag, path, message)
    assert runner.calls == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]  # nothing written


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc")
def test_unwritable_parent_exits_2_before_measuring(runner, capsys):
    # /proc takes no new files, even from root: the check tries, it does not trust permission bits.
    code, _, err = _cli(capsys, "--json", "/proc/tokenprune-bench.json", *FAST)
    assert code == 2, err
    _one_line_error(err, "--json", "/proc/tokenprune-bench.json", "not writable")
    assert runner.calls == []


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes anywhere")
def test_read_only_directory_exits_2_before_measuring(runner, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        code, _, err = _cli(capsys, "--csv", str(locked / "new" / "r.csv"), *FAST)
    finally:
        locked.chmod(0o700)
    assert code == 2
    _one_line_error(err, "--csv", str(locked), "not writable")
    assert runner.calls == []


def test_missing_parent_directories_are_created(runner, tmp_path, capsys):
    path = tmp_path / "new" / "deeper" / "r.json"
    code, _, err = _cli(capsys, "--json", str(path), *FAST)
    assert code == 0, err
    assert json.loads(path.read_text())["results"][1]["method"] == "divprune"


def test_colliding_outputs_are_refused(runner, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # ./a.json and a.json are one file: the CSV would replace the JSON
    code, _, err = _cli(capsys, "sweep", "--json", "a.json", "--csv", "./a.json", *FAST)
    assert code == 2
    _one_line_error(err, "--json and --csv both write", "a.json")
    assert runner.calls == [] and not Path("a.json").exists()
    # so are a file and a symbolic link to it
    os.symlink("real.png", "link.png")
    code, _, err = _cli(capsys, "report", "--quiet", *_results(tmp_path), "--plot", "real.png",
                        "--markdown", "link.png")
    assert code == 2
    _one_line_error(err, "--plot and --markdown both write", "link.png")
    assert not Path("real.png").exists()


def _results(tmp_path, name="in.json"):
    """A results file (JSON or CSV by extension), as ``report`` reads them."""
    path = tmp_path / name
    if not path.exists():
        write = report.write_csv if name.endswith(".csv") else report.write_json
        write(path, {"date": "2026-01-01"}, _fake_rows([("baseline", None)], mode="visual"))
    return [str(path)]


@pytest.mark.parametrize("flag, suffix", [("--markdown", ".json"), ("--json", ".json"), ("--csv", ".csv")])
def test_report_refuses_to_write_over_an_input(flag, suffix, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    inputs = _results(tmp_path, "in" + suffix)
    before = Path(inputs[0]).read_bytes()
    name = "./" + Path(inputs[0]).name  # the same file spelt differently
    for force in ([], ["--force"]):  # --force overwrites existing outputs, never the inputs
        code, _, err = _cli(capsys, "report", "--quiet", *inputs, flag, name, *force)
        assert code == 2
        _one_line_error(err, flag, name, "input")
        assert Path(inputs[0]).read_bytes() == before


@pytest.mark.parametrize("flag, name", [("--json", "r.json"), ("--csv", "r.csv"), ("--plot", "r.png")])
def test_existing_output_needs_force(flag, name, runner, tmp_path, capsys):
    path = tmp_path / name
    path.write_text(PRECIOUS)
    code, _, err = _cli(capsys, "sweep", flag, str(path), *FAST)
    assert code == 2
    _one_line_error(err, flag, str(path), "exists", "--force")
    assert path.read_text() == PRECIOUS and runner.calls == []

    code, _, err = _cli(capsys, "sweep", flag, str(path), "--force", *FAST)
    assert code == 0, err
    assert len(runner.calls) == 1
    if name.endswith(".png"):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert report.load_results(path)[1][0]["method"] == "baseline"


def test_report_markdown_needs_force(tmp_path, capsys):
    md = tmp_path / "table.md"
    md.write_text(PRECIOUS)
    inputs = _results(tmp_path)
    code, _, err = _cli(capsys, "report", "--quiet", *inputs, "--markdown", str(md))
    assert code == 2
    _one_line_error(err, "--markdown", str(md), "--force")
    assert md.read_text() == PRECIOUS
    code, _, err = _cli(capsys, "report", "--quiet", *inputs, "--markdown", str(md), "--force")
    assert code == 0, err
    assert md.read_text().startswith("| model |")
    new = tmp_path / "sub" / "t.md"  # a markdown file in a new directory, like every other output
    assert _cli(capsys, "report", "--quiet", *inputs, "--markdown", str(new))[0] == 0 and new.is_file()


def test_plot_of_modes_without_keep_is_refused_before_measuring(monkeypatch, tmp_path, capsys):
    from tokenprune.bench.suites import spec

    calls = []
    monkeypatch.setattr(spec, "run", lambda config, track: calls.append(config) or [])
    code, _, err = _cli(capsys, "--mode", "spec", "--plot", str(tmp_path / "s.png"), *FAST[:-1], "--quiet")
    assert code == 2
    _one_line_error(err, "--plot", "spec")
    assert calls == []


def test_quality_subcommand_checks_outputs_before_evaluating(monkeypatch, tmp_path, capsys):
    from tokenprune.bench.suites.quality import evaluate

    calls = []
    monkeypatch.setattr(evaluate, "run", lambda *a, **k: calls.append(a) or [])
    path = tmp_path / "q.json"
    path.write_text(PRECIOUS)
    code, _, err = _cli(capsys, "quality", "--quiet", "--json", str(path))
    assert code == 2
    _one_line_error(err, "--json", str(path), "--force")
    code, _, err = _cli(capsys, "quality", "--quiet", "--plot", str(tmp_path))
    assert code == 2
    _one_line_error(err, "--plot", "directory")
    assert calls == [] and path.read_text() == PRECIOUS


# ------------------------------------------------------------------------------- the suites' command lines
def _never(name, calls):
    def measure(*args, **kwargs):
        calls.append(name)
        raise AssertionError(f"{name} ran before the output paths were checked")

    return measure


def _suite_cases(tmp_path):
    """suite -> (module, functions that measure, argv, flag and path the refusal must name)."""
    existing = tmp_path / "old"
    existing.mkdir()
    for name in ("vm.json", "text.csv", "r_latency.json", "ll.json", "kvpress_snapkv.csv"):
        (existing / name).write_text(PRECIOUS)
    (existing / "ckpt").mkdir()
    (existing / "ckpt" / "config.json").write_text(PRECIOUS)
    afile = existing / "file.txt"
    afile.write_text(PRECIOUS)
    return {
        "visual_methods": ("tokenprune.bench.suites.visual_methods", ["run_visual_methods"],
                           ["--out", str(existing / "vm")], "--out", str(existing / "vm.json")),
        "text": ("tokenprune.bench.suites.text", ["run_text_benchmark"],
                 ["--out", str(existing / "text")], "--out", str(existing / "text.csv")),
        "spec": ("tokenprune.bench.suites.spec", ["run_spec_benchmark"],
                 ["--out", str(tmp_path)], "--out", str(tmp_path)),
        "vllm_visual": ("tokenprune.bench.suites.vllm_visual", ["run_vllm_benchmark"],
                        ["--csv", str(tmp_path / "v.csv"), "--json", str(tmp_path / "v.csv")], "--json",
                        str(tmp_path / "v.csv")),
        "kernels": ("tokenprune.bench.suites.kernels", ["bench_mmdp", "bench_attention"],
                    ["--out", str(tmp_path / "k.csv"), "--json", str(afile / "k.json")], "--json",
                    str(afile / "k.json")),
        "quality.evaluate": ("tokenprune.bench.suites.quality.evaluate", ["evaluate"],
                             ["--plot", str(tmp_path / "q.txt")], "--plot", str(tmp_path / "q.txt")),
        "quality.train": ("tokenprune.bench.suites.quality.train", ["train"],
                          ["--out", str(existing / "ckpt")], "--out", str(existing / "ckpt")),
        "rag.run": ("tokenprune.bench.suites.rag.run", ["make_split", "BiEncoderScorer", "quality", "latency", "ttft"],
                    ["--out", str(existing / "r")], "--out", str(existing / "r_latency.json")),
        "rag.llmlingua_side": ("tokenprune.bench.suites.rag.llmlingua_side", ["make_split", "build_compressor_lm"],
                               ["--out", str(existing / "ll.json")], "--out", str(existing / "ll.json")),
        "kvpress_side_by_side": ("tokenprune.bench.suites.kvpress_side_by_side", ["run_kvpress", "compare"],
                                 ["run", "--model-path", str(tmp_path), "--results-dir", str(existing)],
                                 "--results-dir", str(existing / "kvpress_snapkv.csv")),
    }


SUITES = ["visual_methods", "text", "spec", "vllm_visual", "kernels", "quality.evaluate", "quality.train", "rag.run",
          "rag.llmlingua_side", "kvpress_side_by_side"]


@pytest.mark.parametrize("suite", SUITES)
def test_suite_command_line_refuses_bad_outputs_before_measuring(suite, monkeypatch, tmp_path, capsys):
    import importlib

    if suite == "rag.run":
        pytest.importorskip("sentence_transformers")
    module_name, measures, argv, flag, path = _suite_cases(tmp_path)[suite]
    module = importlib.import_module(module_name)
    calls = []
    for name in measures:
        monkeypatch.setattr(module, name, _never(name, calls))
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(SystemExit) as exc:
        module.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error:" in err and "Traceback" not in err, err
    assert flag in err and path in err, err
    assert calls == []
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before  # nothing written


def test_text_suite_saves_its_model_only_where_it_may(monkeypatch, tmp_path, capsys):
    """``--model-path`` holding a saved model is an input; otherwise the model is saved there, so a
    non-empty directory (without config.json) takes --force like any other output."""
    from tokenprune.bench.suites import text

    calls = []
    monkeypatch.setattr(text, "run_text_benchmark", _never("run_text_benchmark", calls))
    models = tmp_path / "models"
    models.mkdir()
    (models / "notes.txt").write_text(PRECIOUS)
    with pytest.raises(SystemExit) as exc:
        text.main(["--out", str(tmp_path / "t"), "--model-path", str(models)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--model-path" in err and str(models) in err and "--force" in err
    (models / "config.json").write_text("{}")  # a saved model: read, not written
    with pytest.raises(AssertionError, match="ran before"):
        text.main(["--out", str(tmp_path / "t"), "--model-path", str(models)])
    assert calls == ["run_text_benchmark"]


def test_suite_command_line_overwrites_with_force(monkeypatch, tmp_path, capsys):
    from tokenprune.bench.suites import visual_methods

    import tokenprune as tp

    variants = [("baseline", None), ("divprune", tp.DivPrune(keep=4))]
    monkeypatch.setattr(visual_methods, "run_visual_methods",
                        lambda keep, reps, warmup: _fake_rows(variants, mode="visual"))
    stem = tmp_path / "vm"
    stem.with_suffix(".json").write_text(PRECIOUS)
    with pytest.raises(SystemExit):
        visual_methods.main(["--out", str(stem)])
    assert "--force" in capsys.readouterr().err and stem.with_suffix(".json").read_text() == PRECIOUS
    visual_methods.main(["--out", str(stem), "--force"])
    for suffix in (".json", ".csv"):
        assert [r["method"] for r in report.load_results(stem.with_suffix(suffix))[1]] == ["baseline", "divprune"]


# ------------------------------------------------------------------------------- the shared check
def test_check_outputs_is_the_one_rule(tmp_path):
    """The helper every entry point calls: all outputs at once, inputs, --force, directories."""
    existing = tmp_path / "a.json"
    existing.write_text(PRECIOUS)
    report.check_outputs([("--json", tmp_path / "new.json", "json"), ("--csv", None, "csv")])
    report.check_outputs([("--json", existing, "json")], force=True)
    with pytest.raises(ValueError, match="--json.*exists.*--force"):
        report.check_outputs([("--json", existing, "json")])
    with pytest.raises(ValueError, match="--json and --markdown both write"):
        report.check_outputs([("--json", tmp_path / "b.json", "json"), ("--markdown", tmp_path / "b.json", "file")])
    with pytest.raises(ValueError, match="input"):
        report.check_outputs([("--markdown", existing, "file")], inputs=[tmp_path / "." / "a.json"], force=True)
    hard = tmp_path / "hard.json"
    os.link(existing, hard)  # another name of the input
    with pytest.raises(ValueError, match="input"):
        report.check_outputs([("--json", hard, "json")], inputs=[existing], force=True)
    # directories: an empty or missing one is fine, a non-empty one needs --force, a file is refused
    report.check_outputs([("--out", tmp_path / "ckpt", "directory")])
    (tmp_path / "ckpt").mkdir()
    report.check_outputs([("--out", tmp_path / "ckpt", "directory")])
    (tmp_path / "ckpt" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="not empty.*--force"):
        report.check_outputs([("--out", tmp_path / "ckpt", "directory")])
    report.check_outputs([("--out", tmp_path / "ckpt", "directory")], force=True)
    with pytest.raises(ValueError, match="not a directory"):
        report.check_outputs([("--out", existing, "directory")], force=True)
    with pytest.raises(ValueError, match="kind"):
        report.check_outputs([("--out", tmp_path / "x", "parquet")])
    assert existing.read_text() == PRECIOUS
