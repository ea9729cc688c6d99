// Products over a support: the sparse backward of the encoder and the sparse
// decoder (docs/design.md, facts 5–6).  Each costs O(B·C·d) for a support of
// width C, never O(B·K·d).
//
//   support_jacobian   sparsemax Jacobian + chain through s = −λD: G and ∂λ rows
//   gather_matmul      out[b] = Σ_j w[b, j] · M[idx[b, j]]        (decoder, ∂x)
//   gather_reduce      ⟨X[b], M[idx]⟩ or ‖X[b] − M[idx]‖²          (∂z, exact D)
//   scatter_matmul     out[k] = Σ_{idx[b,j] = k} w[b, j] · X[b]    (∂prototypes, ∂W_dec)
//
// The sparse transpose is a segmented sum over the entries sorted by latent
// (the binding sorts), so it is deterministic and needs no atomics.  On both
// devices an index outside [0, n_m) makes the gathers' output NaN where it is
// used (instead of reading out of bounds) and falls in no segment of the
// scatter (dropped); no check synchronises the GPU.
//
// Host: cpu::*_row, one output row (the binding runs rows in parallel).  Device (nvcc): the
// kernels and launchers below.
#pragma once

#include <cstdint>
#include <limits>

#include "spade/common.h"

#ifdef __CUDACC__
#include <cuda_runtime.h>

#include <cmath>

#include "spade/block.cuh"
#endif

namespace spade {
namespace cpu {

// G and the ∂λ share of one row (see support_jacobian_kernel).
template <typename T>
void support_jacobian_row(const T* z, const T* grad_z, const T* D, const T* grad_D, T lam, int64_t width, T* G,
                          T& lam_row) {
  T sum = T(0), cnt = T(0);
  for (int64_t j = 0; j < width; ++j)
    if (z[j] > T(0)) sum += grad_z != nullptr ? grad_z[j] : T(0), cnt += T(1);
  const T mean = sum / (cnt > T(1) ? cnt : T(1));
  T acc = T(0);
  for (int64_t j = 0; j < width; ++j) {
    const bool on = z[j] > T(0);  // false for NaN rows
    const T gs = on ? (grad_z != nullptr ? grad_z[j] : T(0)) - mean : T(0);
    G[j] = on ? -lam * gs + (grad_D != nullptr ? grad_D[j] : T(0)) : T(0);
    acc += on ? gs * D[j] : T(0);  // a select: D is NaN on NaN rows
  }
  lam_row = -acc;
}

// out[0, d) = Σ_j w[j] · M[idx[j]]; an index outside [0, n_m) gives NaN.
template <typename T>
void gather_matmul_row(const T* w, const int64_t* idx, int64_t width, const T* M, int64_t n_m, int64_t d, T* out) {
  for (int64_t i = 0; i < d; ++i) out[i] = T(0);
  for (int64_t j = 0; j < width; ++j) {
    if (idx[j] < 0 || idx[j] >= n_m) {
      for (int64_t i = 0; i < d; ++i) out[i] = std::numeric_limits<T>::quiet_NaN();
      continue;
    }
    const T wj = w[j];
    const T* m = M + idx[j] * d;
    for (int64_t i = 0; i < d; ++i) out[i] += wj * m[i];
  }
}

// out[j] = ⟨x, M[idx[j]]⟩ or ‖x − M[idx[j]]‖² (accumulated in T, vectorised);
// NaN for an index outside [0, n_m).
template <typename T, bool kSqDist>
void gather_reduce_row(const T* x, const int64_t* idx, int64_t width, const T* M, int64_t n_m, int64_t d, T* out) {
  for (int64_t j = 0; j < width; ++j) {
    if (idx[j] < 0 || idx[j] >= n_m) {
      out[j] = std::numeric_limits<T>::quiet_NaN();
      continue;
    }
    out[j] = host_reduce<T, kSqDist>(x, M + idx[j] * d, d);
  }
}

// out[0, d) = Σ_{e ∈ [begin, end)} w[order[e]] · X[order[e] / width]: one
// latent's segment of the entries sorted by latent.
template <typename T>
void scatter_matmul_row(const T* w, const int64_t* order, int64_t begin, int64_t end, int64_t width, const T* X,
                        int64_t d, T* out) {
  for (int64_t i = 0; i < d; ++i) out[i] = T(0);
  for (int64_t e = begin; e < end; ++e) {
    const int64_t flat = order[e];
    const T we = w[flat];
    const T* xr = X + (flat / width) * d;
    for (int64_t i = 0; i < d; ++i) out[i] += we * xr[i];
  }
}

}  // namespace cpu

#ifdef __CUDACC__

namespace detail {

template <typename T>
__device__ __forceinline__ T quiet_nan() {
  return static_cast<T>(NAN);
}

inline unsigned blocks_for(int64_t n, int64_t per_block) {
  return static_cast<unsigned>((n + per_block - 1) / per_block);
}

}  // namespace detail

// A warp per row: two passes over the row's C slots.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    support_jacobian_kernel(const T* __restrict__ z, const T* __restrict__ grad_z, const T* __restrict__ D,
                            const T* __restrict__ grad_D, const T* __restrict__ lam, int64_t rows, int64_t width,
                            T* __restrict__ G, T* __restrict__ lam_rows) {
  const int lane = threadIdx.x & 31;
  const int64_t row = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  if (row >= rows) return;  // whole warps leave together
  const int64_t base = row * width;
  T sum = T(0), cnt = T(0);
  for (int64_t j = lane; j < width; j += 32) {
    if (z[base + j] > T(0)) {
      sum += grad_z != nullptr ? grad_z[base + j] : T(0);
      cnt += T(1);
    }
  }
  sum = detail::warp_reduce<false>(sum);
  cnt = detail::warp_reduce<false>(cnt);
  const T mean = sum / detail::max_of(cnt, T(1));
  const T l = *lam;
  T lam_acc = T(0);
  for (int64_t j = lane; j < width; j += 32) {
    const bool on = z[base + j] > T(0);  // false for NaN rows: they get G = 0
    const T gs = on ? (grad_z != nullptr ? grad_z[base + j] : T(0)) - mean : T(0);
    G[base + j] = on ? -l * gs + (grad_D != nullptr ? grad_D[base + j] : T(0)) : T(0);
    lam_acc += on ? gs * D[base + j] : T(0);  // a select: D is NaN on NaN rows
  }
  lam_acc = detail::warp_reduce<false>(lam_acc);
  if (lane == 0) lam_rows[row] = -lam_acc;
}

// Grid (rows, ⌈d / 256⌉): a thread per output column; the row's weights and
// indices are staged through shared memory a tile at a time.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    gather_matmul_kernel(const T* __restrict__ w, const int64_t* __restrict__ idx, int64_t width,
                         const T* __restrict__ M, int64_t n_m, int64_t d, T* __restrict__ out) {
  __shared__ T sw[kThreads];
  __shared__ int64_t sk[kThreads];
  const int64_t row = blockIdx.x;
  const int64_t col = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  T acc = T(0);
  for (int64_t base = 0; base < width; base += blockDim.x) {
    const int64_t j = base + threadIdx.x;
    __syncthreads();
    if (j < width) sw[threadIdx.x] = w[row * width + j], sk[threadIdx.x] = idx[row * width + j];
    __syncthreads();
    const int64_t n = width - base < blockDim.x ? width - base : blockDim.x;
    if (col < d) {
      for (int64_t t = 0; t < n; ++t) {
        const int64_t k = sk[t];
        acc += (k >= 0 && k < n_m) ? sw[t] * M[k * d + col] : detail::quiet_nan<T>();
      }
    }
  }
  if (col < d) out[row * d + col] = acc;
}

// A warp per (row, slot): lanes stride over d, then a shuffle reduction.
template <typename T, bool kSqDist>
__global__ void __launch_bounds__(kThreads)
    gather_reduce_kernel(const T* __restrict__ X, const int64_t* __restrict__ idx, int64_t rows, int64_t width,
                         const T* __restrict__ M, int64_t n_m, int64_t d, T* __restrict__ out) {
  const int lane = threadIdx.x & 31;
  const int64_t flat = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  if (flat >= rows * width) return;
  const int64_t row = flat / width, k = idx[flat];
  if (k < 0 || k >= n_m) {
    if (lane == 0) out[flat] = detail::quiet_nan<T>();
    return;
  }
  const T* xr = X + row * d;
  const T* m = M + k * d;
  T acc = T(0);
  for (int64_t i = lane; i < d; i += 32) {
    if constexpr (kSqDist) {
      const T diff = xr[i] - m[i];
      acc += diff * diff;
    } else {
      acc += xr[i] * m[i];
    }
  }
  acc = detail::warp_reduce<false>(acc);
  if (lane == 0) out[flat] = acc;
}

// Grid (n_out, ⌈d / 256⌉): latent k sums its segment of the sorted entries.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    scatter_matmul_kernel(const T* __restrict__ w, const int64_t* __restrict__ order, const int64_t* __restrict__ seg,
                          int64_t width, const T* __restrict__ X, int64_t d, T* __restrict__ out) {
  const int64_t k = blockIdx.x;
  const int64_t col = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (col >= d) return;
  T acc = T(0);
  for (int64_t e = seg[k]; e < seg[k + 1]; ++e) {
    const int64_t flat = order[e];
    acc += w[flat] * X[(flat / width) * d + col];
  }
  out[k * d + col] = acc;
}

template <typename T>
cudaError_t support_jacobian(const T* z, const T* grad_z, const T* D, const T* grad_D, const T* lam,
                             int64_t rows, int64_t width, T* G, T* lam_rows, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  support_jacobian_kernel<T><<<detail::blocks_for(rows, kThreads / 32), kThreads, 0, stream>>>(
      z, grad_z, D, grad_D, lam, rows, width, G, lam_rows);
  return cudaGetLastError();
}

template <typename T>
cudaError_t gather_matmul(const T* w, const int64_t* idx, int64_t rows, int64_t width, const T* M, int64_t n_m,
                          int64_t d, T* out, cudaStream_t stream) {
  if (rows == 0 || d == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(rows), detail::blocks_for(d, kThreads));
  gather_matmul_kernel<T><<<grid, kThreads, 0, stream>>>(w, idx, width, M, n_m, d, out);
  return cudaGetLastError();
}

template <typename T, bool kSqDist>
cudaError_t gather_reduce(const T* X, const int64_t* idx, int64_t rows, int64_t width, const T* M, int64_t n_m,
                          int64_t d, T* out, cudaStream_t stream) {
  if (rows == 0 || width == 0) return cudaSuccess;
  gather_reduce_kernel<T, kSqDist><<<detail::blocks_for(rows * width, kThreads / 32), kThreads, 0, stream>>>(
      X, idx, rows, width, M, n_m, d, out);
  return cudaGetLastError();
}

template <typename T>
cudaError_t scatter_matmul(const T* w, const int64_t* order, const int64_t* seg, int64_t width, const T* X,
                           int64_t d, int64_t n_out, T* out, cudaStream_t stream) {
  if (n_out == 0 || d == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(n_out), detail::blocks_for(d, kThreads));
  scatter_matmul_kernel<T><<<grid, kThreads, 0, stream>>>(w, order, seg, width, X, d, out);
  return cudaGetLastError();
}

#endif  // __CUDACC__

}  // namespace spade
