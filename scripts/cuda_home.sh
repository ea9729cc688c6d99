# Sourced by the scripts that build against the CUDA toolkit
# (check_cuda_binding.sh, test_gpu_stack.sh):
#
#   cuda_home   prints the toolkit root: $CUDA_HOME when set, else the
#               toolkit that `nvcc` on PATH belongs to (following wrapper
#               scripts such as Debian's /usr/local/bin/nvcc, which exec the
#               real one), else /usr/local/cuda; fails when none has
#               include/cuda_runtime.h.
cuda_home() {
    local nvcc candidates=() c
    [ -n "${CUDA_HOME:-}" ] && candidates+=("$CUDA_HOME")
    if nvcc=$(command -v nvcc 2>/dev/null); then
        nvcc=$(readlink -f "$nvcc")
        # A wrapper script: take the nvcc it execs.
        if head -c 2 "$nvcc" | grep -q '#!'; then
            c=$(grep -oE '/[^ "]*/bin/nvcc' "$nvcc" | head -n 1 || true)
            [ -n "$c" ] && nvcc=$(readlink -f "$c")
        fi
        candidates+=("$(dirname "$(dirname "$nvcc")")")
    fi
    candidates+=(/usr/local/cuda)
    for c in "${candidates[@]}"; do
        if [ -f "$c/include/cuda_runtime.h" ]; then
            echo "$c"
            return 0
        fi
    done
    echo "cuda_home: no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)" >&2
    return 1
}
