#!/usr/bin/env bash
# Test the SAELens integration (spade_kernels/integrations/sae_lens.py) in its
# own virtual environment, .venv-sae-lens, kept apart from the main one.
#
#   scripts/test_sae_lens.sh [pytest args]
#
# sae-lens left to itself pulls the newest torch and several GB of CUDA
# wheels; a constraints file holds torch at the CPU wheel installed first.
# Our package is installed editable without compiling its C++ extension (the
# integration runs on the pure-PyTorch backends; an extension already built in
# the tree is used if it loads), so this never rebuilds or replaces the
# tree's spade_kernels/_C.so; SAE_LENS_BUILD_EXT=1 compiles it against the
# venv's torch instead.  Re-running reuses the venv.  SAE_LENS_VENV and
# SAE_LENS_SPEC override the venv path and the sae-lens requirement.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${SAE_LENS_VENV:-.venv-sae-lens}"
TORCH_PIN="torch==2.13.0"
SAE_LENS_SPEC="${SAE_LENS_SPEC:-sae-lens>=6.54,<7}"
PY="$VENV/bin/python"

start=$(date +%s)
if [ ! -x "$PY" ]; then
    python -m venv "$VENV"
    "$PY" -m pip install -q --upgrade pip setuptools wheel
fi
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
echo "$TORCH_PIN" >"$constraints"

"$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q -c "$constraints" "$TORCH_PIN" numpy
if [ "${SAE_LENS_BUILD_EXT:-0}" = 1 ]; then
    "$PY" -m pip install -q ninja
    "$PY" -m pip install -q --no-build-isolation -c "$constraints" -e . pytest
elif ! "$PY" -c "import importlib.metadata as m; m.version('spade-kernels'); m.version('pytest')" 2>/dev/null; then
    # An isolated build has no torch, so setup.py skips the extension.
    "$PY" -m pip install -q -c "$constraints" -e . pytest
fi
"$PY" -c "import sae_lens" 2>/dev/null || "$PY" -m pip install -q -c "$constraints" "$SAE_LENS_SPEC"
"$PY" - <<'PYEOF'
import importlib.metadata as m

print("versions:", ", ".join(f"{p} {m.version(p)}" for p in ("torch", "sae-lens", "transformer-lens")))
PYEOF
echo "install: $(($(date +%s) - start)) s"

"$PY" -m pytest -q tests/integrations/test_sae_lens.py "$@"
