// Selection of candidates from one K-chunk of GEMM-form scores
// s'[b, k] = λ(2·x_b·a_k − ‖a_k‖²), k ∈ [offset, offset + cols) (the FAISS
// pattern: a library GEMM makes a rows × chunk block of dot products x_b·a_k,
// this forms the scores from them on the fly and reduces them to a few
// candidates per row; only O(rows·chunk + rows·max_candidates) memory is live).
//
// The buffer policy, the same on both devices so they overflow at the same
// point.  Each row keeps `max_candidates` candidates (value, global index) and a bound
// ≤ τ(row) across chunks (`count` = −1 once it overflowed).  For a chunk:
//   1. the bound rises to the chunk's max − 1 (docs/design.md, fact 2);
//   2. the chunk is read in tiles of kThreads entries; every entry above
//      bound − slack is appended, in order, into a buffer with one tile of
//      headroom (max_candidates + kThreads);
//   3. when the buffer then holds more than `max_candidates`, the bound rises to the
//      buffer's own τ (fact 3: τ of a subset ≤ τ of the row) and what falls
//      to or below bound − slack is dropped; a row still above `max_candidates` is
//      marked overflowed and left to the caller's exact path;
//   4. the chunk ends with the same τ-and-compact step, so later chunks prune
//      harder.
// The slack (the caller's margin) covers the rounding of the GEMM-form
// scores: rounding can only keep extra candidates, never drop a support entry.
//
// Host: cpu::select_chunk_row, one row.  Device (nvcc): a block per row, the
// buffer in shared memory while the chunk is processed.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>

#include "spade/common.h"

#ifdef __CUDACC__
#include <cuda_runtime.h>

#include "spade/block.cuh"
#endif

namespace spade {

// The GEMM-form score λ(2·dot − aa) of a dot product x·a with squared norm aa = ‖a‖².
template <typename T>
SPADE_HD T gemm_score(T dot, T aa, T lam) {
  return lam * (T(2) * dot - aa);
}

namespace cpu {

// Keeps the entries of (v, idx)[0, n) above thr, in order; returns how many.
template <typename T>
int64_t compact_above(T* v, int32_t* idx, int64_t n, T thr) {
  int64_t out = 0;
  for (int64_t j = 0; j < n; ++j)
    if (v[j] > thr) v[out] = v[j], idx[out] = idx[j], ++out;
  return out;
}

// The largest GEMM-form score of a chunk row, and whether any score of a
// range is above a threshold: single passes the compiler vectorises (OpenMP
// SIMD reductions; the binding compiles with -fopenmp).  The scores are
// finite here (sanitize zeroes non-finite rows and prototypes), so the
// vector max needs no NaN rule.  Most tiles of a chunk hold nothing to keep
// once the bound has risen: any_above skips them for one compare a lane.
template <typename T>
T chunk_max(const T* dot, const T* aa, T lam, int64_t cols) {
  T mx = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : mx)
  for (int64_t k = 0; k < cols; ++k) mx = std::max(mx, gemm_score(dot[k], aa[k], lam));
  return mx;
}

// The entries of a tile that any_above found something in are appended a
// group of kGroup at a time, the groups with nothing to keep skipped.
constexpr int64_t kGroup = 32;

template <typename T>
bool any_above(const T* dot, const T* aa, T lam, int64_t begin, int64_t end, T thr) {
  int hit = 0;
#pragma omp simd reduction(| : hit)
  for (int64_t k = begin; k < end; ++k) hit |= gemm_score(dot[k], aa[k], lam) > thr ? 1 : 0;
  return hit != 0;
}

// One row of one chunk: `dot` holds x_b·a_k and `aa` ‖a_k‖² for the chunk's
// columns.  buf_idx / buf_val hold the row's `count` candidates (max_candidates slots);
// sval / sidx are the caller's scratch of max_candidates + kThreads slots.
template <typename T>
void select_chunk_row(const T* dot, const T* aa, T lam, int64_t cols, int64_t offset, T slack, int32_t* buf_idx,
                      T* buf_val, int32_t& count, T& bound, int64_t max_candidates, T* sval, int32_t* sidx) {
  int64_t n = count;
  if (n < 0) return;  // overflowed in an earlier chunk
  std::copy(buf_val, buf_val + n, sval);
  std::copy(buf_idx, buf_idx + n, sidx);
  T b = std::max(bound, chunk_max(dot, aa, lam, cols) - T(1));
  for (int64_t base = 0; base < cols; base += kThreads) {
    const int64_t end = std::min(cols, base + kThreads);
    if (!any_above(dot, aa, lam, base, end, b - slack)) continue;  // nothing of this tile is kept
    for (int64_t g = base; g < end; g += kGroup) {  // the tile's kept entries, in order
      const int64_t g_end = std::min(end, g + kGroup);
      if (!any_above(dot, aa, lam, g, g_end, b - slack)) continue;
      for (int64_t k = g; k < g_end; ++k) {
        const T v = gemm_score(dot[k], aa[k], lam);
        if (v > b - slack) sval[n] = v, sidx[n] = static_cast<int32_t>(k + offset), ++n;  // n ≤ max_candidates: fits
      }
    }
    if (n > max_candidates) {
      b = std::max(b, host_tau(sval, n));
      n = compact_above(sval, sidx, n, b - slack);
      if (n > max_candidates) {
        count = -1;
        return;
      }
    }
  }
  if (n > 0) {
    b = std::max(b, host_tau(sval, n));
    n = compact_above(sval, sidx, n, b - slack);
  }
  std::copy(sval, sval + n, buf_val);
  std::copy(sidx, sidx + n, buf_idx);
  count = static_cast<int32_t>(n);
  bound = b;
}

}  // namespace cpu

#ifdef __CUDACC__

template <typename T>
__global__ void __launch_bounds__(kThreads)
    select_chunk_kernel(const T* __restrict__ dots, const T* __restrict__ aa, T lam, int64_t cols, int64_t ld,
                        int64_t offset, const T* __restrict__ margin, int32_t* __restrict__ buf_idx,
                        T* __restrict__ buf_val, int32_t* __restrict__ count, T* __restrict__ bound, int max_candidates) {
  extern __shared__ __align__(16) unsigned char smem[];
  T* sval = reinterpret_cast<T*>(smem);
  int32_t* sidx = reinterpret_cast<int32_t*>(sval + max_candidates + kThreads);
  __shared__ T scratch[32];
  __shared__ int iscratch[32];

  const int64_t row = blockIdx.x;
  int n = count[row];
  if (n < 0) return;  // overflowed in an earlier chunk (uniform across the block)
  const T* s = dots + row * ld;
  T* bv = buf_val + row * max_candidates;
  int32_t* bi = buf_idx + row * max_candidates;
  for (int j = threadIdx.x; j < n; j += blockDim.x) sval[j] = bv[j], sidx[j] = bi[j];

  T mx = -detail::infinity<T>();
  for (int64_t k = threadIdx.x; k < cols; k += blockDim.x) mx = detail::max_of(mx, gemm_score(s[k], aa[k], lam));
  mx = detail::block_reduce<true>(mx, scratch);
  const T slack = margin[row];
  T b = detail::max_of(bound[row], mx - T(1));

  bool overflow = false;
  for (int64_t base = 0; base < cols; base += blockDim.x) {
    const int64_t k = base + threadIdx.x;
    const T v = k < cols ? gemm_score(s[k], aa[k], lam) : -detail::infinity<T>();
    const bool keep = v > b - slack;
    int total;
    const int pos = detail::block_scan(keep, iscratch, total);
    if (keep) sval[n + pos] = v, sidx[n + pos] = static_cast<int32_t>(k + offset);  // n ≤ max_candidates: fits
    n += total;
    if (n > max_candidates) {  // uniform across the block
      __syncthreads();
      b = detail::max_of(b, detail::shared_tau(sval, n, scratch));
      n = detail::compact_above(sval, sidx, n, b - slack, iscratch);
      if (n > max_candidates) {
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

// One chunk for every row (rows × cols dot products, row stride ld; aa the
// chunk's squared norms) on `stream`.
template <typename T>
cudaError_t select_chunk(const T* dots, const T* aa, T lam, int64_t rows, int64_t cols, int64_t ld, int64_t offset,
                         const T* margin, int32_t* buf_idx, T* buf_val, int32_t* count, T* bound, int max_candidates,
                         cudaStream_t stream) {
  if (rows == 0 || cols == 0) return cudaSuccess;
  const size_t shared = select_chunk_shared_bytes<T>(max_candidates);
  if (shared + kStaticSharedBound > kDefaultSharedLimit) {
    const cudaError_t err = cudaFuncSetAttribute(select_chunk_kernel<T>,
                                                 cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                 static_cast<int>(shared));
    if (err != cudaSuccess) return err;
  }
  select_chunk_kernel<T><<<static_cast<unsigned>(rows), kThreads, shared, stream>>>(
      dots, aa, lam, cols, ld, offset, margin, buf_idx, buf_val, count, bound, max_candidates);
  return cudaGetLastError();
}

#endif  // __CUDACC__

}  // namespace spade
