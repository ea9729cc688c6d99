#!/usr/bin/env bash
# Test the SAELens integration (spade_kernels/integrations/sae_lens.py) in its
# own virtual environment, .venv-sae-lens, kept apart from the main one.
#
# sae-lens left to itself pulls the newest torch and several GB of CUDA
# wheels; a constraints file holds torch at the CPU wheel installed first.
# Re-running reuses the venv; SAE_LENS_VENV and SAE_LENS_SPEC override the
# venv path and the sae-lens requirement.  Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${SAE_LENS_VENV:-.venv-sae-lens}"
TORCH_PIN="torch==2.13.0"
SAE_LENS_SPEC="${SAE_LENS_SPEC:-sae-lens>=6.54,<7}"
PY="$VENV/bin/python"

start=$(date +%s)
if [ ! -x "$PY" ]; then
    python -m venv "$VENV"
fi
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
echo "$TORCH_PIN" >"$constraints"

"$PY" -m pip install -q --upgrade pip setuptools wheel ninja
"$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q "$TORCH_PIN" numpy
# --no-build-isolation: the C++ extension builds against the torch above.
"$PY" -m pip install -q --no-build-isolation -c "$constraints" -e . pytest
"$PY" -c "import sae_lens" 2>/dev/null || "$PY" -m pip install -q -c "$constraints" "$SAE_LENS_SPEC"
echo "install: $(( $(date +%s) - start )) s;" \
    "$("$PY" -c 'import importlib.metadata as m; print(*(f"{p} {m.version(p)}" for p in ("torch", "sae-lens", "transformer-lens")), sep=", ")')"

"$PY" -m pytest -q tests/integrations/test_sae_lens.py "$@"
