#!/usr/bin/env bash
# The GPU check, sized to the device lease: 15 minutes of device time in all
# (machine starts included), at most 10 minutes per command.  Two stages, one
# device command each:
#
#   run(command="bash benchmarks/gpu_check.sh --stage 1", timeout_s=360)   # build + GPU tests + CUDA self-tests
#   run(command="bash benchmarks/gpu_check.sh --stage 2", timeout_s=450)   # benchmarks
#   bash benchmarks/gpu_check.sh --dry-run                                 # here, on a CPU: CI runs this
#
# Each stage has a deadline (STAGE1_DEADLINE, STAGE2_DEADLINE seconds; 300
# and 390 by default, 11.5 minutes together, leaving room for up to two
# machine starts).  Every step runs under `timeout` with the smaller of its
# own cap and what is left of the stage's deadline, and a step that cannot
# get its minimum is skipped, not started.  After every step the stage
# rewrites $OUT/summary.txt (one line), and each step's output goes straight
# to its file under $OUT, so a stage cut short by its deadline or by the
# device tool still brings back what it finished (at most 8 files a stage,
# as the tool allows).  The summary line is printed last.
#
# Stage 1 files: summary.txt info.txt build.log selftest.log gpu_tests.log
# Stage 2 files: summary.txt info.txt build.log encode/results.json
#                train/results.json bench_sparse.json bench.log
#
# Budget (caps, not predictions; measured on the 2-core CPU machine where a
# number is given):
#   build     150 s  sm_90 only, MAX_JOBS=16: the whole extension took 98–174 s on 2 cores
#   selftest   60 s  CMake build of the two self-tests for sm_90 + ctest
#   gpu tests rest   pytest -n 8 when pytest-xdist is there (the GPU image has it): Triton
#                    compiles dominate (sm_90, triton 3.6: 15–37 s per fp32 select config,
#                    3–4 s per bf16 one, < 1 s for every other kernel; scripts/triton_aot_check.py)
#   encode    170 s  S1–S3 bf16, reference/torch/triton/native + floor, 10 repeats after 3 warm-ups;
#                    the select kernel's autotuning compiles its 4 bf16 configs once (~15 s)
#   train     150 s  S1/S2 bf16, the same implementations
#   sparse    rest   benchmarks/bench_sparse.py (support products, torch vs Triton vs CUDA)
#
# Copy what comes back to benchmarks/results/gpu-<device>-encode|train and
# regenerate the tables with `python benchmarks/make_tables.py`.
set -uo pipefail
set -m  # job control: each step is a process group the deadline guard can interrupt whole
cd "$(dirname "$0")/.."

MODE=""
case "${1:-}" in
  --stage) MODE="stage${2:-}" ;;
  --dry-run) MODE="dry" ;;
esac
case "$MODE" in
  stage1 | stage2 | dry) ;;
  *)
    echo "usage: bash benchmarks/gpu_check.sh --stage 1|2 | --dry-run" >&2
    exit 2
    ;;
esac

PY="${PYTHON:-python3}"
OUT="${OUT:-benchmarks/results/gpu-local}"
[ "$MODE" = dry ] && OUT="$(mktemp -d)"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
STAGE1_DEADLINE="${STAGE1_DEADLINE:-300}"
STAGE2_DEADLINE="${STAGE2_DEADLINE:-390}"

# The contracts and the backends' own knobs on CUDA tensors (their CPU cases run in CI: -k "not cpu").
GPU_TESTS=(tests/test_contract_encode.py tests/test_contract_training.py tests/test_contract_products.py
  tests/test_backend_triton.py tests/test_backend_native.py tests/test_ops.py -k "not cpu")
BENCH_COMMON=(--dtypes bfloat16 --backends reference,torch,triton,native --baselines floor --no-plots)
ENCODE=(--modes encode --shape S1 --shape S2 --shape S3)
TRAIN=(--modes train --shape S1 --shape S2)
BENCH_RUNS=(--repeats 10 --warmup 3)

# -- steps --------------------------------------------------------------------

SUMMARY=()
STAGE_START=$SECONDS
DEADLINE=0

write_summary() {
  local line="gpu_check $MODE: ${SUMMARY[*]:-nothing ran}; $((SECONDS - STAGE_START)) of ${DEADLINE} s"
  echo "$line" >"$OUT/summary.txt"
}

# step NAME CAP MIN COMMAND...: run COMMAND (a function or a program) with a
# limit of min(CAP, time left), unless less than MIN seconds are left;
# records "NAME ok|failed|timed out|skipped (N s)".  At the limit the step
# gets SIGINT first, so pytest and the bench end cleanly with what they have.
step() {
  local name=$1 cap=$2 min=$3
  shift 3
  local left=$((DEADLINE - (SECONDS - STAGE_START)))
  if ((left < min)); then
    SUMMARY+=("$name skipped (deadline: ${left} s left, needs ${min})")
    write_summary
    return 1
  fi
  local limit=$((cap < left ? cap : left)) t0=$SECONDS rc pid watchdog
  local expired="$OUT/.expired"
  rm -f "$expired"
  echo "== $name (limit ${limit} s)"
  # The step runs as its own process group (job control is on), so the
  # watchdog's SIGINT reaches every process of it; SIGKILL 20 s later.
  "$@" &
  pid=$!
  (sleep "$limit" && touch "$expired" && kill -INT -- "-$pid" && sleep 20 && kill -KILL -- "-$pid") 2>/dev/null &
  watchdog=$!
  wait "$pid"
  rc=$?
  kill -- "-$watchdog" 2>/dev/null
  wait "$watchdog" 2>/dev/null
  local status=ok
  if [ -e "$expired" ]; then status="timed out"; elif ((rc != 0)); then status="failed rc=$rc"; fi
  rm -f "$expired"
  SUMMARY+=("$name $status ($((SECONDS - t0)) s${STEP_NOTE:+, $STEP_NOTE})")
  STEP_NOTE=""
  write_summary
  return "$rc"
}
STEP_NOTE=""

info() {
  {
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
    "$PY" -m spade_kernels info
    "$PY" -c "import setuptools, numpy; print('setuptools', setuptools.__version__, '| numpy', numpy.__version__)"
  } >"$OUT/info.txt" 2>&1
  tail -n 30 "$OUT/info.txt"
}

cuda_kernels() {
  "$PY" -c "import sys; from spade_kernels import _ext; sys.exit(0 if _ext.cuda_kernels() else 1)" 2>/dev/null
}

build() {
  # In place, sm_90 only (the machine is a Hopper); the log keeps the -Xptxas report.
  TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS="${MAX_JOBS:-16}" "$PY" setup.py build_ext --inplace >"$OUT/build.log" 2>&1
  local rc=$?
  grep "^spade_kernels:" "$OUT/build.log"
  tail -n 3 "$OUT/build.log"
  cuda_kernels || { echo "the CUDA kernels are not registered after the build"; return 1; }
  return "$rc"
}

selftest() {
  { cmake -S . -B build/cmake-gpu -DCMAKE_CUDA_ARCHITECTURES=90 &&
    cmake --build build/cmake-gpu -j 16 &&
    ctest --test-dir build/cmake-gpu --output-on-failure; } >"$OUT/selftest.log" 2>&1
  local rc=$?
  tail -n 6 "$OUT/selftest.log"
  return "$rc"
}

gpu_tests() {
  local parallel=()
  "$PY" -c "import xdist" 2>/dev/null && parallel=(-n 8)
  SPADE_TEST_GPU=1 "$PY" -m pytest -q -p no:cacheprovider "${parallel[@]}" --durations=15 "${GPU_TESTS[@]}" \
    >"$OUT/gpu_tests.log" 2>&1
  local rc=$?
  STEP_NOTE="$(grep -E "[0-9]+ (passed|failed)" "$OUT/gpu_tests.log" | tail -n 1 | tr -d '=' | xargs)"
  tail -n 25 "$OUT/gpu_tests.log"
  return "$rc"
}

bench() {  # bench NAME SECONDS ARGS...: one sweep into $OUT/NAME/results.json (rewritten per configuration)
  local name=$1 seconds=$2
  shift 2
  "$PY" -m spade_kernels bench "$@" "${BENCH_COMMON[@]}" --deadline "$seconds" --out "$OUT/$name" \
    2>&1 | tee -a "$OUT/bench.log" | tail -n 25
  rm -f "$OUT/$name/results.csv"
}

bench_sparse() {
  "$PY" -m pytest -q -p no:cacheprovider benchmarks/bench_sparse.py --benchmark-json "$OUT/bench_sparse.json" \
    --benchmark-columns=median,iqr,rounds 2>&1 | tee -a "$OUT/bench.log" | tail -n 25
}

# -- stages -------------------------------------------------------------------

case "$MODE" in
  stage1)
    DEADLINE=$STAGE1_DEADLINE
    step info 30 5 info
    step build 150 60 build || { echo "$(cat "$OUT/summary.txt")"; exit 1; }
    step selftest 60 20 selftest
    step gpu-tests 600 60 gpu_tests
    ;;
  stage2)
    DEADLINE=$STAGE2_DEADLINE
    step info 30 5 info
    if cuda_kernels; then
      SUMMARY+=("build kept (the CUDA kernels were already registered)")
    else
      step build 150 60 build || { echo "$(cat "$OUT/summary.txt")"; exit 1; }
    fi
    # A sweep stops starting configurations 30 s before its cap (the last one must finish inside it).
    step encode 170 60 bench encode 140 "${ENCODE[@]}" "${BENCH_RUNS[@]}"
    step train 150 60 bench train 120 "${TRAIN[@]}" "${BENCH_RUNS[@]}"
    step sparse 600 30 bench_sparse
    ;;
  dry)
    # Every step that needs no GPU, on this machine, with the same arguments;
    # the benchmarks at a tiny CPU shape instead of S1–S3.
    DEADLINE=$((STAGE1_DEADLINE + STAGE2_DEADLINE))
    echo "plan: stage 1 (deadline ${STAGE1_DEADLINE} s): info 30 s, build 150 s, selftest 60 s, gpu-tests the rest"
    echo "      ${GPU_TESTS[*]}"
    echo "plan: stage 2 (deadline ${STAGE2_DEADLINE} s): info 30 s, build 150 s (if needed), encode 170 s, train 150 s, sparse the rest"
    echo "      bench ${ENCODE[*]} / ${TRAIN[*]}; ${BENCH_COMMON[*]} ${BENCH_RUNS[*]}"
    echo "budget: $((STAGE1_DEADLINE + STAGE2_DEADLINE)) s of commands in two device calls (each under 600 s), of 900 s of device time with the machine's starts"
    ((STAGE1_DEADLINE < 600 && STAGE2_DEADLINE < 600 && STAGE1_DEADLINE + STAGE2_DEADLINE <= 720)) ||
      { echo "gpu_check: the stage deadlines do not fit the lease"; exit 1; }
    # (the stage's arguments, with the tiny shape in place of S1–S3)
    DRY=(--device cpu --shape 16,8,64 --repeats 1 --warmup 0)
    step tools 10 1 bash -c "command -v cmake ctest nvcc >/dev/null"
    # The guard itself: a step past its limit is interrupted (and its whole group with it).
    step deadline-guard 2 1 bash -c "sleep 60 & sleep 60; wait"
    case "${SUMMARY[-1]}" in
      "deadline-guard timed out ("[2-9]" s)") SUMMARY[-1]="deadline-guard ok (a 60 s step stopped at its 2 s limit)" ;;
      *) echo "gpu_check: the deadline guard did not stop a step: ${SUMMARY[-1]}"; exit 1 ;;
    esac
    step setup-parses 60 5 "$PY" setup.py --version
    step cmake-configure 60 5 cmake -S . -B "$OUT/cmake" -DCMAKE_CUDA_ARCHITECTURES=90
    step collect-gpu-tests 120 5 env SPADE_TEST_GPU=1 "$PY" -m pytest -q -p no:cacheprovider --collect-only "${GPU_TESTS[@]}"
    step encode 120 5 bench encode 60 "${ENCODE[@]:0:2}" "${DRY[@]}"
    step train 120 5 bench train 60 "${TRAIN[@]:0:2}" "${DRY[@]}"
    step collect-sparse 120 5 "$PY" -m pytest -q -p no:cacheprovider --collect-only benchmarks/bench_sparse.py
    for f in encode/results.json train/results.json; do
      [ -s "$OUT/$f" ] || { echo "gpu_check: the dry run wrote no $f"; exit 1; }
    done
    ;;
esac
echo
cat "$OUT/summary.txt"
case "$(cat "$OUT/summary.txt")" in
  *failed* | *"timed out"*) exit 1 ;;
esac
