// Exact sparsemax over dense score rows, without a sort.
//
// τ solves Σ_k max(s_k − τ, 0) = 1, and max(s) − 1 ≤ τ (docs/design.md,
// fact 2), so only entries above max − 1 can be in the support.  Per row:
//   1. the row maximum m;
//   2. the entries above m − 1, relative to m;
//   3. Michelot's iteration from m − 1 over them (spade::michelot_tau), which
//      rises monotonically to the exact τ (fact 4);
// all relative to m so the sums stay accurate for large scores.  A row with a
// NaN or +inf entry, or only −inf entries, has no sparsemax: τ = NaN and the
// projected row is NaN (as torch.softmax does for NaN rows).
//
// Host: cpu::sparsemax_row (float64 arithmetic).  Device (nvcc): one block
// per row, float32 arithmetic for float32/bfloat16/float16 scores, the
// candidates in shared memory when they fit (else re-read from the row).
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "spade/common.h"

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "spade/block.cuh"
#endif

namespace spade {
namespace cpu {

// One row: out = max(s − τ, 0) and its τ; `cand` is the caller's scratch.
template <typename T>
void sparsemax_row(const T* s, T* out, T* tau, int64_t cols, std::vector<double>& cand) {
  double m = -std::numeric_limits<double>::infinity();
  bool undefined = false;
  for (int64_t k = 0; k < cols; ++k) {
    const double v = static_cast<double>(s[k]);
    if (std::isnan(v) || v == std::numeric_limits<double>::infinity()) undefined = true;
    if (v > m) m = v;
  }
  if (undefined || !(m > -std::numeric_limits<double>::infinity())) {
    *tau = std::numeric_limits<T>::quiet_NaN();
    for (int64_t k = 0; k < cols; ++k) out[k] = std::numeric_limits<T>::quiet_NaN();
    return;
  }
  cand.clear();
  for (int64_t k = 0; k < cols; ++k) {
    const double v = static_cast<double>(s[k]) - m;
    if (v > -1.0) cand.push_back(v);
  }
  const double t = host_tau(cand.data(), static_cast<int64_t>(cand.size()));  // relative to m (cand holds 0)
  *tau = static_cast<T>(t + m);
  for (int64_t k = 0; k < cols; ++k) {
    const double v = static_cast<double>(s[k]) - m - t;
    out[k] = static_cast<T>(v > 0.0 ? v : 0.0);
  }
}

}  // namespace cpu

#ifdef __CUDACC__

// Shared-memory capacity for the compacted candidates of one row.
constexpr int kSparsemaxShared = 4096;

namespace detail {

template <typename T>
__device__ __forceinline__ float to_float(T v) {
  return static_cast<float>(v);
}
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}
template <>
__device__ __forceinline__ float to_float<__half>(__half v) {
  return __half2float(v);
}
// Explicit conversions: torch's extension build defines __CUDA_NO_HALF_CONVERSIONS__
// and __CUDA_NO_BFLOAT16_CONVERSIONS__, which remove the implicit ones.
template <typename T>
__device__ __forceinline__ T from_float(float v) {
  return static_cast<T>(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16(v);
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half(v);
}

}  // namespace detail

// τ (float) of each row of `scores` (rows × cols, row stride `ld`), written to
// `tau`, and, when `out` is non-null, the projection out = max(s − τ, 0).
template <typename T>
__global__ void __launch_bounds__(kThreads)
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

  // 3. Michelot from τ = m − 1 (values relative to m; `undefined` is uniform).
  float t = 0.f;
  if (!undefined) {
    t = michelot_tau(0.f, [&](float t_rel, float& sum, float& cnt) {
      if (in_shared) {
        for (int j = threadIdx.x; j < n; j += blockDim.x)
          if (cand[j] > t_rel) sum += cand[j], cnt += 1.f;
      } else {
        for (int64_t k = threadIdx.x; k < cols; k += blockDim.x) {
          const float v = detail::to_float(row[k]) - m;
          if (v > t_rel) sum += v, cnt += 1.f;
        }
      }
      sum = detail::block_reduce<false>(sum, scratch);
      cnt = detail::block_reduce<false>(cnt, scratch);
    });
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

// Launches one block per row on `stream`; returns the launch error.
template <typename T>
cudaError_t sparsemax_rows(const T* scores, T* out, float* tau, int64_t rows, int64_t cols, int64_t ld,
                           cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  sparsemax_rows_kernel<T><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(scores, out, tau, cols, ld);
  return cudaGetLastError();
}

#endif  // __CUDACC__

}  // namespace spade
