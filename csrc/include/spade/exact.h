// Exact sparsemax codes over candidate sets (the per-row merge).
//
// The candidates (a superset of the support, from the selection) get their
// distances recomputed directly, D = Σ_i (x_i − a_i)² (no cancellation:
// docs/design.md, "Precision contract"), then scores s = −λ·(D − min D)
// relative to the nearest candidate (shift invariance, fact 1: the codes
// s − τ never subtract two large numbers), the exact τ (Michelot, fact 4), and
// the support sorted by value descending, zero padded to the row's width.  A
// candidate index outside [0, n_a) — −1 in particular — is an empty slot, on
// both devices.
//
// Host: D of every candidate latent by latent (sparse.h's
// gather_reduce_latents, D accumulated in T, vectorised), then
// cpu::exact_codes_row, one row.  Device
// (nvcc): a block per row, a warp per candidate, a bitonic sort in shared
// memory.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

#include "spade/common.h"
#include "spade/sparse.h"

#ifdef __CUDACC__
#include <cuda_runtime.h>

#include "spade/block.cuh"
#endif

namespace spade {
namespace cpu {

// One row from its candidates' distances D (computed latent by latent by the
// binding, gather_reduce_latents; an empty slot's is ignored); s and support are the caller's scratch (no allocation per row).
template <typename T>
void exact_codes_row(const int64_t* cand, const T* D, int64_t n_a, int64_t width, T lam, T* values,
                     int64_t* indices, int64_t& support_size, T* dist, std::vector<T>& s,
                     std::vector<std::pair<T, int64_t>>& support) {
  const T inf = std::numeric_limits<T>::infinity();
  auto empty = [&](int64_t j) { return cand[j] < 0 || cand[j] >= n_a; };
  T dmin = inf;
  for (int64_t j = 0; j < width; ++j)
    if (!empty(j)) dmin = std::min(dmin, D[j]);
  support.clear();
  if (dmin < inf) {
    for (int64_t j = 0; j < width; ++j)
      if (!empty(j) && D[j] < inf) support.emplace_back(-lam * (D[j] - dmin), j);
    s.resize(support.size());
    for (size_t i = 0; i < support.size(); ++i) s[i] = support[i].first;
    const T tau = host_tau(s.data(), static_cast<int64_t>(s.size()));
    support.erase(std::remove_if(support.begin(), support.end(), [&](const auto& p) { return !(p.first > tau); }),
                  support.end());
    for (auto& p : support) p.first -= tau;
    std::sort(support.begin(), support.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
  }
  support_size = static_cast<int64_t>(support.size());
  for (int64_t r = 0; r < width; ++r) {
    const bool in = r < support_size;
    values[r] = in ? support[r].first : T(0);
    indices[r] = in ? cand[support[r].second] : 0;
    dist[r] = in ? D[support[r].second] : T(0);
  }
}

}  // namespace cpu

#ifdef __CUDACC__

template <typename T>
__global__ void __launch_bounds__(kThreads)
    exact_codes_kernel(const T* __restrict__ x, const T* __restrict__ A, int64_t n_a, int64_t d,
                       const int64_t* __restrict__ cand,
                       int64_t width, int padded, T lam, T* __restrict__ values, int64_t* __restrict__ indices,
                       int64_t* __restrict__ support_size, T* __restrict__ dist) {
  extern __shared__ __align__(16) unsigned char smem[];
  T* key = reinterpret_cast<T*>(smem);                 // scores, padded to a power of two
  T* sD = key + padded;                                 // distances, by candidate slot
  int32_t* slot = reinterpret_cast<int32_t*>(sD + width);  // candidate slot of each key
  __shared__ T scratch[32];
  __shared__ int iscratch[32];

  const int64_t row = blockIdx.x;
  const int64_t* c = cand + row * width;
  const T* xr = x + row * d;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;

  // 1. D on every candidate, a warp per candidate.
  for (int64_t j = warp; j < width; j += n_warps) {
    const int64_t k = c[j];
    T acc = T(0);
    const bool valid = k >= 0 && k < n_a;  // out-of-range slots count as empty
    if (valid) {
      const T* a = A + k * d;
      for (int64_t i = lane; i < d; i += 32) {
        const T diff = xr[i] - a[i];
        acc += diff * diff;
      }
    }
    acc = detail::warp_reduce<false>(acc);
    if (lane == 0) sD[j] = valid ? acc : detail::infinity<T>();
  }
  __syncthreads();

  // 2. Scores relative to the nearest candidate; empty slots are −inf.
  T dmin = detail::infinity<T>();
  for (int64_t j = threadIdx.x; j < width; j += blockDim.x) dmin = detail::min_of(dmin, sD[j]);
  dmin = -detail::block_reduce<true>(-dmin, scratch);
  const bool any = dmin < detail::infinity<T>();
  for (int j = threadIdx.x; j < padded; j += blockDim.x) {
    const bool valid = j < width && sD[j] < detail::infinity<T>();
    key[j] = valid ? -lam * (sD[j] - dmin) : -detail::infinity<T>();
    slot[j] = j;
  }
  __syncthreads();

  // 3. Exact τ over the candidates (max = 0), then the support in order.
  const T tau = any ? detail::shared_tau(key, static_cast<int>(width), scratch) : detail::infinity<T>();
  detail::bitonic_sort_desc(key, slot, padded);
  int local = 0;
  for (int j = threadIdx.x; j < padded; j += blockDim.x) local += key[j] > tau ? 1 : 0;
  const int size = detail::block_reduce<false>(local, iscratch);
  for (int64_t r = threadIdx.x; r < width; r += blockDim.x) {
    const bool in = r < size;
    const int32_t j = in ? slot[r] : 0;
    values[row * width + r] = in ? key[r] - tau : T(0);
    indices[row * width + r] = in ? c[j] : 0;
    dist[row * width + r] = in ? sD[j] : T(0);
  }
  if (threadIdx.x == 0) support_size[row] = size;
}

template <typename T>
cudaError_t exact_codes(const T* x, const T* A, int64_t rows, int64_t n_a, int64_t d, const int64_t* cand,
                        int64_t width,
                        T lam, T* values, int64_t* indices, int64_t* support_size, T* dist,
                        cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  const int64_t padded = pow2_at_least(width);
  const size_t shared = exact_codes_shared_bytes<T>(width);
  if (shared + kStaticSharedBound > kDefaultSharedLimit) {
    const cudaError_t err = cudaFuncSetAttribute(exact_codes_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                 static_cast<int>(shared));
    if (err != cudaSuccess) return err;
  }
  exact_codes_kernel<T><<<static_cast<unsigned>(rows), kThreads, shared, stream>>>(
      x, A, n_a, d, cand, width, static_cast<int>(padded), lam, values, indices, support_size, dist);
  return cudaGetLastError();
}

#endif  // __CUDACC__

}  // namespace spade
