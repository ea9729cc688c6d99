#!/usr/bin/env bash
# Test the Overcomplete integration (spade_kernels/sae/integrations/overcomplete.py)
# in its own virtual environment, .venv-overcomplete, kept apart from the main one.
#
#   scripts/test_overcomplete.sh [pytest args]
#
# Why not plain `pip install overcomplete`: overcomplete 0.3.0 requires
# torchvision and timm, and with them pip replaces the CPU torch by the newest
# CUDA torch (several GB); the registry has no torchvision for the CPU torch
# (PyPI's torchvision fails to import against torch 2.13.0+cpu: "operator
# torchvision::nms does not exist").  So overcomplete is installed with
# --no-deps, followed by exactly what `import overcomplete.sae` imports (the
# package __init__ imports every submodule):
#   overcomplete.sae, .metrics:        einops, numpy, tqdm
#   overcomplete.optimization:         scikit-learn, scipy
#   overcomplete.visualization, .data: matplotlib < 3.9 (0.3.0 calls
#                                      matplotlib.cm.get_cmap, removed in 3.9),
#                                      opencv (headless), scikit-image, pillow
#   overcomplete.models:               torchvision (only `transforms`, for the
#                                      vision backbones); timm is imported lazily
# torchvision is replaced by a stand-in: a package `torchvision` with a module
# `transforms` whose every attribute raises, written to $VENV/standins and put
# on the path by a .pth file.  Importing overcomplete works; building one of
# its vision backbones (DinoV2, SigLIP, ...) raises with this explanation.
# Users with a normal torch install the real requirements: pip install
# "spade-kernels[overcomplete]".
# Re-running reuses the venv; OC_VENV overrides its path; OC_BUILD_EXT=1
# compiles the extension against the venv's torch (see pinned_venv.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=scripts/pinned_venv.sh
. scripts/pinned_venv.sh
OC_SPEC="overcomplete==0.3.0"
IMPORT_DEPS=(einops tqdm scikit-learn scipy "matplotlib<3.9" opencv-python-headless scikit-image pillow)
VENV="${OC_VENV:-.venv-overcomplete}"

start=$(date +%s)
pinned_venv "$VENV" "${OC_BUILD_EXT:-0}"
site=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
standins="$(cd "$VENV" && pwd)/standins"
if [ ! -f "$standins/torchvision/transforms.py" ]; then
    mkdir -p "$standins/torchvision"
    cat >"$standins/torchvision/__init__.py" <<'PYEOF'
"""Stand-in for torchvision, written by scripts/test_overcomplete.sh (not the real package).

overcomplete 0.3.0 imports ``torchvision.transforms`` at import time, for its
vision backbones only; no torchvision build exists for the CPU torch this venv
pins.  Any use of it raises.
"""
__version__ = "0.0.0+spade-kernels-standin"
PYEOF
    cat >"$standins/torchvision/transforms.py" <<'PYEOF'
"""Stand-in for torchvision.transforms (see the package docstring): every attribute raises."""


def __getattr__(name):
    raise RuntimeError(
        f"torchvision.transforms.{name}: this is the stand-in torchvision of scripts/test_overcomplete.sh; "
        "Overcomplete's vision backbones need the real torchvision"
    )
PYEOF
    echo "$standins" >"$site/spade_kernels_test_standins.pth"
fi
if ! "$PY" -c "import overcomplete.sae" 2>/dev/null; then
    # pip then reports torchvision and timm as "not installed": expected.
    "$PY" -m pip install -q --no-deps "$OC_SPEC"
    "$PY" -m pip install -q -c "$CONSTRAINTS" "${IMPORT_DEPS[@]}"
fi
"$PY" - <<'PYEOF'
import importlib.metadata as m

import overcomplete.sae  # noqa: F401  (fails here, not in pytest, if a dependency is missing)
import torchvision

assert "standin" in torchvision.__version__, torchvision.__file__
pkgs = ("torch", "overcomplete", "matplotlib", "numpy", "einops")
print("versions:", ", ".join(f"{p} {m.version(p)}" for p in pkgs), "| torchvision: stand-in")
PYEOF
echo "install: $(($(date +%s) - start)) s"

"$PY" -m pytest -q tests/integrations/test_overcomplete.py "$@"
