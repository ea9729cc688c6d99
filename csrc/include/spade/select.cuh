// Selection epilogue for one K-chunk of GEMM-form scores (the FAISS pattern:
// a library GEMM produces a B × chunk score block, a small kernel reduces it
// to a few candidates per row, and only O(B·chunk + B·cap) memory is live).
//
// One block per row.  The row keeps a buffer of `cap` candidates (value, global
// index) and a bound ≤ τ(row) across chunks.  For a chunk it
//   1. raises the bound to chunk max − 1 (DESIGN.md §2 fact 2);
//   2. appends every entry above bound − margin, a 256-wide tile at a time,
//      in order (prefix count), into a buffer with one tile of headroom;
//   3. when the buffer then holds more than `cap`, raises the bound to its
//      own τ (fact 3: τ of a subset ≤ τ of the row) and drops what falls to
//      or below it; a row that still holds more than `cap` is marked
//      overflowed (count = −1) and left to the caller's exact path;
//   4. ends with the same τ-and-compact step, so later chunks prune harder.
// The margin covers the rounding of the GEMM-form scores (computed by the
// caller): rounding can only keep extra candidates, never drop a support
// entry.  The buffer lives in shared memory while the chunk is processed.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "spade/common.cuh"
#include "spade/launch.h"

namespace spade {

template <typename T>
__global__ void __launch_bounds__(kThreads)
    select_chunk_kernel(const T* __restrict__ scores, int64_t cols, int64_t ld, int64_t offset,
                        const T* __restrict__ margin, int32_t* __restrict__ buf_idx, T* __restrict__ buf_val,
                        int32_t* __restrict__ count, T* __restrict__ bound, int cap) {
  extern __shared__ __align__(16) unsigned char smem[];
  T* sval = reinterpret_cast<T*>(smem);
  int32_t* sidx = reinterpret_cast<int32_t*>(sval + cap);
  __shared__ T scratch[32];
  __shared__ int iscratch[32];

  const int64_t row = blockIdx.x;
  int n = count[row];
  if (n < 0) return;  // overflowed in an earlier chunk (uniform across the block)
  const T* s = scores + row * ld;
  T* bv = buf_val + row * cap;
  int32_t* bi = buf_idx + row * cap;
  for (int j = threadIdx.x; j < n; j += blockDim.x) sval[j] = bv[j], sidx[j] = bi[j];

  T mx = -detail::infinity<T>();
  for (int64_t k = threadIdx.x; k < cols; k += blockDim.x) mx = detail::max_of(mx, s[k]);
  mx = detail::block_reduce<true>(mx, scratch);
  const T slack = margin[row];
  T b = detail::max_of(bound[row], mx - T(1));

  bool overflow = false;
  for (int64_t base = 0; base < cols; base += blockDim.x) {
    const int64_t k = base + threadIdx.x;
    const T v = k < cols ? s[k] : -detail::infinity<T>();
    const bool keep = v > b - slack;
    int total;
    const int pos = detail::block_scan(keep, iscratch, total);
    if (keep) sval[n + pos] = v, sidx[n + pos] = static_cast<int32_t>(k + offset);  // n ≤ cap: fits
    n += total;
    if (n > cap) {  // uniform across the block
      __syncthreads();
      b = detail::max_of(b, detail::shared_tau(sval, n, scratch));
      n = detail::compact_above(sval, sidx, n, b - slack, iscratch);
      if (n > cap) {
        overflow = true;
        break;
      }
    }
  }
  __syncthreads();
  if (overflow) {
    if (threadIdx.x == 0) count[row] = -1;
    return;
  }
  if (n > 0) {
    b = detail::max_of(b, detail::shared_tau(sval, n, scratch));  // (synchronised above)
    n = detail::compact_above(sval, sidx, n, b - slack, iscratch);
  }
  for (int j = threadIdx.x; j < n; j += blockDim.x) bv[j] = sval[j], bi[j] = sidx[j];
  if (threadIdx.x == 0) count[row] = n, bound[row] = b;
}

template <typename T>
cudaError_t select_chunk(const T* scores, int64_t rows, int64_t cols, int64_t ld, int64_t offset,
                         const T* margin, int32_t* buf_idx, T* buf_val, int32_t* count, T* bound, int cap,
                         cudaStream_t stream) {
  if (rows == 0 || cols == 0) return cudaSuccess;
  const size_t shared = select_chunk_shared_bytes<T>(cap, kThreads);
  if (shared + kStaticSharedBound > kDefaultSharedLimit) {
    const cudaError_t err = cudaFuncSetAttribute(select_chunk_kernel<T>,
                                                 cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                 static_cast<int>(shared));
    if (err != cudaSuccess) return err;
  }
  select_chunk_kernel<T><<<static_cast<unsigned>(rows), kThreads, shared, stream>>>(
      scores, cols, ld, offset, margin, buf_idx, buf_val, count, bound, cap);
  return cudaGetLastError();
}

}  // namespace spade
