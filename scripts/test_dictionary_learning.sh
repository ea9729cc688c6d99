#!/usr/bin/env bash
# Test the dictionary_learning integration
# (spade_kernels/sae/integrations/dictionary_learning.py) in its own virtual
# environment, .venv-dictionary-learning, kept apart from the main one.
#
#   scripts/test_dictionary_learning.sh [pytest args]
#
# Why not plain `pip install dictionary-learning`: its only release (0.1.0)
# requires nnsight>=0.3,<0.4, which requires torchvision, diffusers and
# accelerate, and with them pip replaces the CPU torch by the newest torch and
# several GB of CUDA wheels.  So dictionary-learning and nnsight are installed
# with --no-deps, followed by exactly what the modules the integration uses
# import when they are imported:
#   dictionary_learning (package __init__ -> buffer.py): nnsight, einops, tqdm
#   dictionary_learning.training:                         wandb (+ the above)
#   nnsight 0.3 at import: pyyaml, pydantic, accelerate, transformers,
#                          python-socketio[client], pillow
# torchvision, diffusers, datasets, zstandard, circuitsvis, umap-learn, plotly
# and pandas are never imported on those paths (they serve model tracing,
# dataset streaming and interpretability plots), so they are left out.
# wandb is only imported: the tests run trainSAE with use_wandb=False.
#
# A constraints file holds torch at the CPU wheel installed first.  Our
# package is installed editable without compiling its C++ extension (an
# isolated build has no torch, so setup.py skips it): the tree's
# spade_kernels/_C.so is used when it loads, and is never rebuilt or replaced
# here; DL_BUILD_EXT=1 compiles it against the venv's torch instead.
# Re-running reuses the venv; DL_VENV overrides its path.
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=scripts/pinned_venv.sh
. scripts/pinned_venv.sh
DL_SPEC="dictionary-learning==0.1.0"
NNSIGHT_SPEC="nnsight>=0.3,<0.4"
IMPORT_DEPS=(einops tqdm wandb pyyaml pydantic accelerate transformers "python-socketio[client]" pillow)

start=$(date +%s)
pinned_venv "${DL_VENV:-.venv-dictionary-learning}" "${DL_BUILD_EXT:-0}"
if ! "$PY" -c "import dictionary_learning.training" 2>/dev/null; then
    # pip then reports their other requirements as "not installed": expected.
    "$PY" -m pip install -q --no-deps "$DL_SPEC" "$NNSIGHT_SPEC"
    "$PY" -m pip install -q -c "$CONSTRAINTS" "${IMPORT_DEPS[@]}"
fi
"$PY" - <<'PYEOF'
import importlib.metadata as m

import dictionary_learning.training  # noqa: F401  (fails here, not in pytest, if a dependency is missing)

pkgs = ("torch", "dictionary-learning", "nnsight", "transformers", "accelerate", "wandb")
print("versions:", ", ".join(f"{p} {m.version(p)}" for p in pkgs))
PYEOF
echo "install: $(($(date +%s) - start)) s"

"$PY" -m pytest -q tests/integrations/test_dictionary_learning.py "$@"
