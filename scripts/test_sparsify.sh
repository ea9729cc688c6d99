#!/usr/bin/env bash
# Test the sparsify integration (spade_kernels/sae/integrations/sparsify.py) in its
# own virtual environment, .venv-sparsify, kept apart from the main one.
#
#   scripts/test_sparsify.sh [pytest args]
#
# EleutherAI's sparsify is published as `eai-sparsify` (the PyPI package named
# `sparsify` is an unrelated project); it imports as `sparsify`.  Left to
# itself it pulls the newest torch and several GB of CUDA wheels (through
# torch, accelerate and transformers); a constraints file holds torch at the
# CPU wheel installed first.  The tests train on a tiny randomly initialised
# Hugging Face model built from a config and a tokenized dataset built in
# memory, so they need no network.  Our package is installed editable without
# compiling its C++ extension (an extension already built in the tree is used
# if it loads); SPARSIFY_BUILD_EXT=1 compiles it against the venv's torch.
# Re-running reuses the venv; SPARSIFY_VENV and SPARSIFY_SPEC override the venv
# path and the requirement.
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=scripts/pinned_venv.sh
. scripts/pinned_venv.sh
SPARSIFY_SPEC="${SPARSIFY_SPEC:-eai-sparsify==1.3.3}"

start=$(date +%s)
pinned_venv "${SPARSIFY_VENV:-.venv-sparsify}" "${SPARSIFY_BUILD_EXT:-0}"
"$PY" -c "import sparsify.trainer" 2>/dev/null || "$PY" -m pip install -q -c "$CONSTRAINTS" "$SPARSIFY_SPEC"
"$PY" - <<'PYEOF'
import importlib.metadata as m

import sparsify.trainer  # noqa: F401  (fails here, not in pytest, if a dependency is missing)

pkgs = ("torch", "eai-sparsify", "transformers", "datasets", "accelerate")
print("versions:", ", ".join(f"{p} {m.version(p)}" for p in pkgs))
PYEOF
echo "install: $(($(date +%s) - start)) s"

"$PY" -m pytest -q tests/integrations/test_sparsify.py "$@"
