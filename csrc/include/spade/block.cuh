// Block-level building blocks of the CUDA kernels: reductions, a prefix
// count for order-preserving compaction, the threshold of a shared-memory
// array (Michelot, spade/common.h), and a bitonic sort.  Every helper is
// called by all threads of a block (they synchronise), with blockDim.x a
// multiple of 32.  CUDA only; no torch headers.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "spade/common.h"

namespace spade {

namespace detail {

template <typename T>
__device__ __forceinline__ T infinity() {
  return static_cast<T>(INFINITY);
}

// fmax/fmin ignore a NaN operand symmetrically, so a butterfly reduction gives
// every thread the same result even when some inputs are NaN (a plain
// a > b ? a : b does not, and threads would then disagree on control flow
// around __syncthreads).
__device__ __forceinline__ float max_of(float a, float b) {
  return fmaxf(a, b);
}
__device__ __forceinline__ double max_of(double a, double b) {
  return fmax(a, b);
}
__device__ __forceinline__ float min_of(float a, float b) {
  return fminf(a, b);
}
__device__ __forceinline__ double min_of(double a, double b) {
  return fmin(a, b);
}
__device__ __forceinline__ int max_of(int a, int b) {
  return a > b ? a : b;
}


// The identity of the reduction: −inf for a maximum, 0 for a sum.
template <bool kMax, typename T>
__device__ __forceinline__ T reduce_identity() {
  if constexpr (kMax) {
    return -infinity<T>();
  } else {
    return T(0);
  }
}

template <bool kMax, typename T>
__device__ __forceinline__ T warp_reduce(T v) {
  for (int o = 16; o > 0; o >>= 1) {
    const T w = __shfl_xor_sync(0xffffffffu, v, o);
    v = kMax ? max_of(v, w) : v + w;
  }
  return v;
}

// Sum (kMax = false) or maximum (kMax = true) of v over the block; every
// thread gets the result.  `scratch` holds at least 32 values (int or
// floating T; a maximum needs a floating T).
template <bool kMax, typename T>
__device__ T block_reduce(T v, T* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_reduce<kMax>(v);
  __syncthreads();  // scratch may still be read by a previous reduction
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  const int n_warps = blockDim.x >> 5;
  v = lane < n_warps ? scratch[lane] : reduce_identity<kMax, T>();
  v = warp_reduce<kMax>(v);
  return v;
}

// Exclusive prefix count of `flag` over the threads of the block, in thread
// order; `total` receives the block's count.  `scratch` holds ≥ 32 ints.
__device__ __forceinline__ int block_scan(bool flag, int* scratch, int& total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const unsigned ballot = __ballot_sync(0xffffffffu, flag);
  const int in_warp = __popc(ballot & ((1u << lane) - 1u));
  __syncthreads();
  if (lane == 0) scratch[warp] = __popc(ballot);
  __syncthreads();
  int before = 0, sum = 0;
  const int n_warps = blockDim.x >> 5;
  for (int w = 0; w < n_warps; ++w) {
    const int c = scratch[w];
    before += w < warp ? c : 0;
    sum += c;
  }
  total = sum;
  return before + in_warp;
}

// Keeps the entries of (vals, idx)[0, n) above `thr`, in order, at the front;
// returns how many.  In place: an entry only moves to a lower slot, after
// every thread has read the tile it belongs to.
template <typename T>
__device__ int compact_above(T* vals, int32_t* idx, int n, T thr, int* scratch) {
  int out = 0;
  for (int base = 0; base < n; base += blockDim.x) {
    const int j = base + threadIdx.x;
    T v = T(0);
    int32_t i = 0;
    bool keep = false;
    if (j < n) {
      v = vals[j];
      i = idx[j];
      keep = v > thr;
    }
    int total;
    const int pos = block_scan(keep, scratch, total);
    if (keep) {
      vals[out + pos] = v;
      idx[out + pos] = i;
    }
    out += total;
  }
  __syncthreads();
  return out;
}

// Sparsemax threshold τ of vals[0, n) (n ≥ 1, finite or −inf) in shared
// memory: the block's maximum, then spade::michelot_tau with block sums.
template <typename T>
__device__ T shared_tau(const T* vals, int n, T* scratch) {
  T m = -infinity<T>();
  for (int j = threadIdx.x; j < n; j += blockDim.x) m = max_of(m, vals[j]);
  m = block_reduce<true>(m, scratch);
  return michelot_tau(m, [&](T t, T& sum, T& cnt) {
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
      const T v = vals[j] - m;
      if (v > t) sum += v, cnt += T(1);
    }
    sum = block_reduce<false>(sum, scratch);  // uniform across the block
    cnt = block_reduce<false>(cnt, scratch);
  });
}

// Sorts (key, val)[0, n) by key, descending; n is a power of two.
template <typename T>
__device__ void bitonic_sort_desc(T* key, int32_t* val, int n) {
  for (int k = 2; k <= n; k <<= 1) {
    for (int j = k >> 1; j > 0; j >>= 1) {
      for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const int l = i ^ j;
        if (l > i) {
          const bool descending = (i & k) == 0;
          const T a = key[i], b = key[l];
          if (descending ? (a < b) : (a > b)) {
            key[i] = b, key[l] = a;
            const int32_t t = val[i];
            val[i] = val[l], val[l] = t;
          }
        }
      }
      __syncthreads();
    }
  }
}

}  // namespace detail
}  // namespace spade
