#!/usr/bin/env bash
# Compile-checks the CUDA half of the torch binding (csrc/cuda/*.cpp) on a
# machine without a CUDA build of torch: the host compiler parses it against
# the installed torch's headers (CPU wheels ship c10/cuda and ATen/cuda but
# not one generated header, stood in by scripts/binding_check/) and the CUDA
# toolkit's headers.  C++17, the oldest standard the supported torch
# releases build extensions with.  Linking needs a CUDA torch (setup.py on a
# GPU machine: benchmarks/gpu_check.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/cuda_home.sh
. scripts/cuda_home.sh
cuda_home="$(cuda_home)"
mapfile -t torch_inc < <(python -c "from torch.utils.cpp_extension import include_paths; print('\n'.join(include_paths()))")
flags=(-std=c++17 -fsyntax-only -Wall -Wextra -Wno-c++20-extensions -Wno-unused-parameter)
for inc in "${torch_inc[@]}"; do flags+=(-isystem "$inc"); done
flags+=(-isystem scripts/binding_check -isystem "$cuda_home/include" -Icsrc/include)
for src in csrc/cuda/*.cpp; do
  echo "compile-check $src"
  "${CXX:-g++}" "${flags[@]}" "$src"
done
