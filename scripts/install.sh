#!/usr/bin/env bash
# Create .venv (if missing) and install softprompt with pinned CPU torch and the test extras.
# Idempotent: a second run only checks. Usage: bash scripts/install.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null
# Pin torch first: an unpinned torch may pull a multi-GB CUDA build. On the project's machines
# pip takes the CPU build of 2.13.0 from local disk; elsewhere PyPI's Linux wheel is the CUDA
# one, so give TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu for the CPU build.
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0 \
  ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]"
