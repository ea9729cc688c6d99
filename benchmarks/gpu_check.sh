#!/usr/bin/env bash
# One-shot GPU verification for a session that has a GPU (device tool), in one
# call: build the extension with its CUDA kernels, GPU tests (Triton, the
# extension's ops, the cuda backend), encode + training-step benchmarks at S1–S3
# for reference, torch, triton and cuda.
#
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"])   # $OUT is set by the tool
#
# Results land in $OUT (default benchmarks/results/gpu-local): info.txt,
# build.log, gpu_tests.log, cuda_selftest.log, bench_sparse.json,
# encode/results.json, train/results.json (CSV copies are removed to stay
# within the tool's 8-file limit). Copy encode/ and train/ to
# benchmarks/results/gpu-<device>-encode|train and regenerate the README with
# `python benchmarks/make_readme_table.py` (it redraws the plots).
#
# The GPU machine has no internet: missing pure-Python packages (entmax for
# the paper-style baseline) travel as wheels in .whl/ (see the device README):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl entmax==1.3
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu-local}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
# The extension with CUDA ops, in place (sm_90 only: the machine is a Hopper;
# build log kept for the -Xptxas report).
export PYTHONPATH=$PWD:${PYTHONPATH:-}
TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} \
  python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; }
tail -3 "$OUT/build.log"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; python3 -m spade_kernels info; } 2>&1 | tee "$OUT/info.txt"
SPADE_TEST_GPU=1 python3 -m pytest -q -p no:cacheprovider tests/test_triton_encode.py tests/test_triton_sparse.py \
  tests/test_ext.py tests/test_cuda.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -15
# CUDA kernels (torch-free) against float64 references
{ cmake -S . -B build/cmake && cmake --build build/cmake -j8 && ctest --test-dir build/cmake --output-on-failure; } > "$OUT/cuda_selftest.log" 2>&1
tail -5 "$OUT/cuda_selftest.log"
# atomic vs latent-sorted sparse-transpose product, gathers: torch vs Triton
python3 -m pytest -q -p no:cacheprovider benchmarks/bench_sparse.py --benchmark-json "$OUT/bench_sparse.json" 2>&1 | tail -25
python3 -m spade_kernels bench --shape S1 --shape S2 --shape S3 --dtypes bfloat16 --modes encode \
  --backends reference,torch,triton,cuda --no-plots --out "$OUT/encode" 2>&1 | tail -30
python3 -m spade_kernels bench --shape S1 --shape S2 --dtypes bfloat16 --modes train \
  --backends reference,torch,triton,cuda --no-plots --out "$OUT/train" 2>&1 | tail -20
rm -f "$OUT/encode/results.csv" "$OUT/train/results.csv"
