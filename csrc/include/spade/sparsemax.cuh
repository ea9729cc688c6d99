// Exact sparsemax over dense score rows, one thread block per row, no sort.
//
// DESIGN.md §2: τ solves Σ_k max(s_k − τ, 0) = 1, and max(s) − 1 ≤ τ (fact 2).
// So only entries above max − 1 can be in the support.  Each block
//   1. reduces the row maximum m,
//   2. compacts the entries above m − 1 into shared memory (when they fit;
//      otherwise it keeps reading the row from global memory),
//   3. runs Michelot's iteration τ ← (Σ_{s>τ} s − 1) / #{s>τ} from τ = m − 1,
//      which rises monotonically to the exact τ (fact 4),
// all relative to m so the sums stay accurate for large scores.  A row with
// a NaN or +inf entry, or only −inf entries, has no sparsemax: τ = NaN and
// the projected row is NaN (as torch.softmax does for NaN rows).
//
// Raw pointers and a cudaStream_t only: no torch headers (STYLE.md).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "spade/common.cuh"
#include "spade/launch.h"

namespace spade {

// Shared-memory capacity for the compacted candidates of one row.
constexpr int kSparsemaxShared = 4096;
constexpr int kSparsemaxThreads = kThreads;
constexpr int kSparsemaxMaxIters = kMichelotMaxIters;

namespace detail {

template <typename T>
__device__ __forceinline__ float to_float(T v) {
  return static_cast<float>(v);
}

template <typename T>
__device__ __forceinline__ T from_float(float v) {
  return static_cast<T>(v);
}

}  // namespace detail

// τ (float) of each row of `scores` (rows × cols, row stride `ld`), written to
// `tau`, and, when `out` is non-null, the projection out = max(s − τ, 0).
template <typename T>
__global__ void __launch_bounds__(kSparsemaxThreads)
    sparsemax_rows_kernel(const T* __restrict__ scores, T* __restrict__ out, float* __restrict__ tau,
                          int64_t cols, int64_t ld) {
  __shared__ float cand[kSparsemaxShared];
  __shared__ float scratch[32];
  __shared__ int n_cand;
  const T* row = scores + static_cast<int64_t>(blockIdx.x) * ld;

  // 1. Row maximum, and whether the row has a NaN / +inf.
  float m = -INFINITY, bad = 0.f;
  for (int64_t k = threadIdx.x; k < cols; k += blockDim.x) {
    const float v = detail::to_float(row[k]);
    m = fmaxf(m, v);
    bad += (isnan(v) || v == INFINITY) ? 1.f : 0.f;
  }
  m = detail::block_reduce<true>(m, scratch);
  bad = detail::block_reduce<false>(bad, scratch);
  const bool undefined = bad > 0.f || !(m > -INFINITY);

  // 2. Entries above m − 1, relative to m, into shared memory.
  if (threadIdx.x == 0) n_cand = 0;
  __syncthreads();
  for (int64_t k = threadIdx.x; k < cols && !undefined; k += blockDim.x) {
    const float v = detail::to_float(row[k]) - m;
    if (v > -1.f) {
      const int slot = atomicAdd(&n_cand, 1);
      if (slot < kSparsemaxShared) cand[slot] = v;
    }
  }
  __syncthreads();
  const int n = n_cand;
  const bool in_shared = n <= kSparsemaxShared;

  // 3. Michelot from τ = −1 (relative to m): monotone, exact in finitely many steps.
  float t = -1.f;
  for (int it = 0; it < kSparsemaxMaxIters && !undefined; ++it) {
    float sum = 0.f, cnt = 0.f;
    if (in_shared) {
      for (int j = threadIdx.x; j < n; j += blockDim.x)
        if (cand[j] > t) sum += cand[j], cnt += 1.f;
    } else {
      for (int64_t k = threadIdx.x; k < cols; k += blockDim.x) {
        const float v = detail::to_float(row[k]) - m;
        if (v > t) sum += v, cnt += 1.f;
      }
    }
    sum = detail::block_reduce<false>(sum, scratch);
    cnt = detail::block_reduce<false>(cnt, scratch);
    const float next = (sum - 1.f) / fmaxf(cnt, 1.f);
    if (!(next > t)) break;  // converged (uniform across the block)
    t = next;
  }

  const float tau_row = undefined ? NAN : t + m;
  if (threadIdx.x == 0) tau[blockIdx.x] = tau_row;
  if (out != nullptr) {
    T* orow = out + static_cast<int64_t>(blockIdx.x) * ld;
    for (int64_t k = threadIdx.x; k < cols; k += blockDim.x) {
      const float v = undefined ? NAN : fmaxf(detail::to_float(row[k]) - m - t, 0.f);
      orow[k] = detail::from_float<T>(v);
    }
  }
}

// Launches one block per row on `stream`.  Returns the launch error, if any.
template <typename T>
cudaError_t sparsemax_rows(const T* scores, T* out, float* tau, int64_t rows, int64_t cols, int64_t ld,
                           cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  sparsemax_rows_kernel<T><<<static_cast<unsigned>(rows), kSparsemaxThreads, 0, stream>>>(scores, out, tau,
                                                                                          cols, ld);
  return cudaGetLastError();
}

}  // namespace spade
