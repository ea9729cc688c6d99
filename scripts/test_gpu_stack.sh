#!/usr/bin/env bash
# The GPU machine's software stack, tested on this CPU machine (no GPU needed).
#
# The lent GPU machine runs Python 3.12, torch 2.11.0+cu130 and triton 3.6.0,
# with no network; CI runs torch 2.13 (CPU) and triton 3.9.  This script
# proves here what can be proven without the GPU, so a lease is spent on
# measuring:
#   1. a venv with that stack: Python 3.12 when this machine has it, torch
#      pinned to 2.11.0 (the CUDA 13.0 build from the registry, ~4.7 GB with
#      its CUDA wheels; it imports without a GPU), and setuptools pinned to
#      the lowest release the package supports (pyproject.toml);
#   2. the extension built with its CUDA kernels for sm_90, with CUDA_HOME
#      set to the toolkit of the nvcc on PATH; fails unless the import
#      reports the CUDA kernels;
#   3. every Triton kernel compiled for sm_90 by triton 3.6 (register/spill
#      report and compile times);
#   4. the whole test suite on that stack (Triton kernels on the interpreter);
#   5. the CUDA build failing on purpose (a flag nvcc rejects): the install
#      must still succeed with the CPU ops and one line saying why CUDA was
#      skipped.
#
# The tree is copied (tracked and untracked-not-ignored files) into
# $GPU_STACK_DIR/tree, so this build never touches the working tree's
# spade_kernels/_C.so.  The venv is kept between runs (GPU_STACK_DIR,
# default .venv-gpu-stack/, git-ignored).
#
#   bash scripts/test_gpu_stack.sh          # CI runs this
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
STACK="${GPU_STACK_DIR:-$ROOT/.venv-gpu-stack}"
TORCH_PIN="torch==2.11.0"
# The lowest supported setuptools (pyproject.toml's build-system.requires).
SETUPTOOLS_PIN="setuptools==66.1.1"
# triton 3.6's interpreter turns 1-element arrays into ints with int(), which
# numpy 2.4 made an error; on a GPU the kernels are compiled and numpy does
# not enter (the GPU image has numpy 2.5).
NUMPY_PIN="numpy<2.4"
# Python 3.12 (the GPU machine's) when one runs here (a pyenv shim may exist
# without a 3.12 selected), else python3.
find_python() {
    local c
    for c in python3.12 "$(pyenv root 2>/dev/null)"/versions/3.12*/bin/python3 python3; do
        if command -v "$c" >/dev/null 2>&1 && "$c" -c "import venv" >/dev/null 2>&1; then
            command -v "$c"
            return 0
        fi
    done
    return 1
}
PYTHON="${GPU_STACK_PYTHON:-$(find_python)}"
start=$SECONDS
step() { echo "== test_gpu_stack [$((SECONDS - start)) s]: $*"; }

# shellcheck source=scripts/cuda_home.sh
. scripts/cuda_home.sh
CUDA_HOME="$(cuda_home)"
export CUDA_HOME

VENV="$STACK/venv"
PY="$VENV/bin/python"
mkdir -p "$STACK"
CONSTRAINTS="$STACK/constraints.txt"
printf '%s\n' "$TORCH_PIN" "$SETUPTOOLS_PIN" "$NUMPY_PIN" >"$CONSTRAINTS"
step "venv ($("$PYTHON" --version), $TORCH_PIN, $SETUPTOOLS_PIN, $NUMPY_PIN) in $VENV"
[ -x "$PY" ] || "$PYTHON" -m venv "$VENV"
"$PY" -m pip install -q --upgrade pip
"$PY" -m pip install -q -c "$CONSTRAINTS" "$TORCH_PIN" "$SETUPTOOLS_PIN" "$NUMPY_PIN" wheel ninja
"$PY" -c "import torch, triton, setuptools, numpy, sys; print(f'Python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}, setuptools {setuptools.__version__}, numpy {numpy.__version__}')"

step "copy of the tree in $STACK/tree"
rm -rf "$STACK/tree"
mkdir -p "$STACK/tree"
git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf - | tar -xf - -C "$STACK/tree"
cd "$STACK/tree"

step "build with the CUDA kernels for sm_90 (CUDA_HOME=$CUDA_HOME)"
TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS="${MAX_JOBS:-2}" \
  "$PY" -m pip install --no-build-isolation -c "$CONSTRAINTS" -e ".[dev]" >"$STACK/build.log" 2>&1 \
  || { tail -40 "$STACK/build.log"; exit 1; }
grep "^spade_kernels:" "$STACK/build.log" || true
"$PY" - <<'EOF'
import sys

from spade_kernels import _ext

print(f"spade_kernels._ext: available={_ext.available()} cuda_kernels={_ext.cuda_kernels()}")
if not _ext.cuda_kernels():
    sys.exit(f"test_gpu_stack: the CUDA kernels are not registered: {_ext.cuda_reason or _ext.reason}")
EOF

step "Triton kernels compiled for sm_90 by triton 3.6"
"$PY" scripts/triton_aot_check.py --arch 90 | tail -n 4

step "the test suite"
"$PY" -m pytest -q -p no:cacheprovider tests
# The slow ones too: torch.distributed.checkpoint and gloo's failures on this stack's torch.
"$PY" -m pytest -q -p no:cacheprovider -m slow tests

step "a failing CUDA build still installs the CPU ops"
rm -rf "$STACK/fallback"
NVCC_APPEND_FLAGS="--no-such-nvcc-flag" TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS="${MAX_JOBS:-2}" \
  "$PY" setup.py -q build_ext --build-temp "$STACK/fallback/tmp" --build-lib "$STACK/fallback/lib" \
  >"$STACK/fallback.log" 2>&1 || { tail -40 "$STACK/fallback.log"; exit 1; }
grep "^spade_kernels: building the CPU ops only, skipping CUDA: the CUDA library failed to build" "$STACK/fallback.log"
[ -f "$STACK/fallback/lib/spade_kernels/_C.so" ] || { echo "test_gpu_stack: no _C.so after the failed CUDA build"; exit 1; }
if compgen -G "$STACK/fallback/lib/spade_kernels/_C_cuda*" >/dev/null; then
  echo "test_gpu_stack: a _C_cuda library was installed although its build failed"
  exit 1
fi
step "passed"
