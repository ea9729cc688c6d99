#!/usr/bin/env bash
# One-shot set-up into the active Python environment.
# Keeps an existing torch (a CUDA build on a GPU machine); otherwise installs
# the CPU wheel torch==2.13.0 so pip never pulls several GB of CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --upgrade pip setuptools wheel
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0 numpy
python -c "import triton" 2>/dev/null || python -m pip install -q triton || echo "triton not installed: the triton backend will be unavailable"
python -m pip install -q --no-build-isolation -e ".[dev]"
