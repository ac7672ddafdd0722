#!/usr/bin/env bash
# Regenerates the committed CPU results under benchmarks/results/cpu/ with tokenprune-bench:
# latency (baseline vs DivPrune vs FastV) on the tiny and medium presets, and keep sweeps with plots;
# speculative decoding (DraftTree vs greedy vs HF prompt lookup) and RAG context pruning on their tiny models.
# Every file records machine, versions, git commit and parameters; the summary tables for the README
# are written to benchmarks/results/cpu/summary.md. It rewrites those committed files on purpose, so every
# command passes --force (tokenprune-bench refuses to overwrite an existing file without it).
#
#   bash benchmarks/run_cpu_results.sh              # python from $PYTHON, else .venv, else python3
#   THREADS=1 bash benchmarks/run_cpu_results.sh    # pin torch threads (steadier on a shared machine)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
OUT=benchmarks/results/cpu
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
COMMON=(--device cpu --force)
[ -n "${THREADS:-}" ] && COMMON+=(--threads "$THREADS")
bench() { PYTHONPATH=. "$PY" -m tokenprune.bench "$@"; }

bench latency --model tiny-llava --reps 7 "${COMMON[@]}" \
  --json "$OUT/tiny-llava_latency.json" --csv "$OUT/tiny-llava_latency.csv"
bench latency --model medium-llava --reps 3 "${COMMON[@]}" \
  --json "$OUT/medium-llava_latency.json" --csv "$OUT/medium-llava_latency.csv"
bench sweep --model tiny-llava --methods divprune,fastv:layer=2 --keep 288,192,128,64,32 --reps 3 "${COMMON[@]}" \
  --json "$OUT/tiny-llava_sweep.json" --csv "$OUT/tiny-llava_sweep.csv" --plot "$OUT/tiny-llava_sweep.png"
bench sweep --model medium-llava --methods divprune,fastv:layer=2 --keep 192,128,64 --reps 3 "${COMMON[@]}" \
  --json "$OUT/medium-llava_sweep.json" --csv "$OUT/medium-llava_sweep.csv" --plot "$OUT/medium-llava_sweep.png"
bench --mode spec --model tiny --new-tokens 64 --reps 3 "${COMMON[@]}" \
  --json "$OUT/spec_tiny.json" --csv "$OUT/spec_tiny.csv"
bench --mode rag --model tiny --reps 3 "${COMMON[@]}" --json "$OUT/rag_tiny.json" --csv "$OUT/rag_tiny.csv"

bench report "$OUT/tiny-llava_latency.json" "$OUT/medium-llava_latency.json" \
  "$OUT/tiny-llava_sweep.json" "$OUT/medium-llava_sweep.json" "$OUT/spec_tiny.json" "$OUT/rag_tiny.json" \
  --markdown "$OUT/summary.md" --quiet --force
echo "results in $OUT"
