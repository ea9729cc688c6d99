# Sourced by the scripts that test against outside libraries
# (test_sae_lens.sh, test_dictionary_learning.sh, test_minilm_example.sh):
#
#   pinned_venv VENV BUILD_EXT
#
# makes (or reuses) the virtual environment VENV with torch pinned to the CPU
# wheel and this package installed editable with pytest, and sets PY (its
# python) and CONSTRAINTS (a constraints file holding the torch pin; pass it
# with -c to every later install, or pip resolves a CUDA torch of several GB).
# BUILD_EXT=1 compiles the C++ extension against the venv's torch; otherwise
# the package is installed without compiling it (an isolated build has no
# torch, so setup.py skips it) and the tree's spade_kernels/_C.so is used when
# it loads, never rebuilt or replaced.
TORCH_PIN="torch==2.13.0"

pinned_venv() {
    local venv="$1" build_ext="${2:-0}"
    PY="$venv/bin/python"
    if [ ! -x "$PY" ]; then
        python -m venv "$venv"
        "$PY" -m pip install -q --upgrade pip setuptools wheel
    fi
    CONSTRAINTS="$(mktemp)"
    # shellcheck disable=SC2064
    trap "rm -f '$CONSTRAINTS'" EXIT
    echo "$TORCH_PIN" >"$CONSTRAINTS"
    "$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q -c "$CONSTRAINTS" "$TORCH_PIN" numpy
    if [ "$build_ext" = 1 ]; then
        "$PY" -m pip install -q ninja
        "$PY" -m pip install -q --no-build-isolation -c "$CONSTRAINTS" -e . pytest
    elif ! "$PY" -c "import importlib.metadata as m; m.version('spade-kernels'); m.version('pytest')" 2>/dev/null; then
        "$PY" -m pip install -q -c "$CONSTRAINTS" -e . pytest
    fi
}
