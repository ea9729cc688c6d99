#!/usr/bin/env bash
# Test the SAELens integration (spade_kernels/sae/integrations/sae_lens.py) in its
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

# shellcheck source=scripts/pinned_venv.sh
. scripts/pinned_venv.sh
SAE_LENS_SPEC="${SAE_LENS_SPEC:-sae-lens>=6.54,<7}"

start=$(date +%s)
pinned_venv "${SAE_LENS_VENV:-.venv-sae-lens}" "${SAE_LENS_BUILD_EXT:-0}"
"$PY" -c "import sae_lens" 2>/dev/null || "$PY" -m pip install -q -c "$CONSTRAINTS" "$SAE_LENS_SPEC"
"$PY" - <<'PYEOF'
import importlib.metadata as m

print("versions:", ", ".join(f"{p} {m.version(p)}" for p in ("torch", "sae-lens", "transformer-lens")))
PYEOF
echo "install: $(($(date +%s) - start)) s"

"$PY" -m pytest -q tests/integrations/test_sae_lens.py "$@"
