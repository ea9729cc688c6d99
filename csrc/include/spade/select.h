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
#include <type_traits>

#include "spade/common.h"

#if defined(__SSE2__) && !defined(__CUDACC__)
#include <immintrin.h>
#endif

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
  for (int64_t j = 0; j < n; ++j) {  // branch-free: each entry stored, kept by advancing past it
    const T x = v[j];
    const int32_t i = idx[j];
    v[out] = x, idx[out] = i;
    out += x > thr ? 1 : 0;
  }
  return out;
}

// The largest GEMM-form score of a range of a chunk row: one pass the
// compiler vectorises, with independent partial maxima (one running max is a
// chain of dependent instructions).  The scores are finite here (sanitize
// zeroes non-finite rows and prototypes), so the max needs no NaN rule.
template <typename T>
T chunk_max(const T* dot, const T* aa, T lam, int64_t cols) {
  constexpr int64_t kLanes = 32;  // independent maxima: the reduction is not one dependency chain
  T lane[kLanes];
  for (int64_t l = 0; l < kLanes; ++l) lane[l] = -std::numeric_limits<T>::infinity();
  int64_t k = 0;
  for (; k + kLanes <= cols; k += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) lane[l] = std::max(lane[l], gemm_score(dot[k + l], aa[k + l], lam));
  for (; k < cols; ++k) lane[0] = std::max(lane[0], gemm_score(dot[k], aa[k], lam));
  T mx = lane[0];
  for (int64_t l = 1; l < kLanes; ++l) mx = std::max(mx, lane[l]);
  return mx;
}

// Appends the entries of [begin, end) whose score is above thr to
// (sval, sidx) from slot n, in order, and returns the new count; with kMax,
// raises mx to the largest score of the range.  Portable: groups of kGroup
// scores formed in a small array (the compiler vectorises the group's max
// and its "anything above?"), the groups with nothing to keep skipped.
constexpr int64_t kGroup = 16;

template <bool kMax, typename T>
int64_t append_above(const T* dot, const T* aa, T lam, int64_t begin, int64_t end, T thr, int64_t offset, T* sval,
                     int32_t* sidx, int64_t n, T& mx) {
  T s[kGroup];
  for (int64_t g = begin; g < end; g += kGroup) {
    const int64_t w = std::min(kGroup, end - g);
    int hit = 0;
    T gm = mx;
    for (int64_t j = 0; j < w; ++j) {
      s[j] = gemm_score(dot[g + j], aa[g + j], lam);
      hit |= s[j] > thr ? 1 : 0;
      if constexpr (kMax) gm = std::max(gm, s[j]);
    }
    if constexpr (kMax) mx = gm;
    if (!hit) continue;
    for (int64_t j = 0; j < w; ++j)
      if (s[j] > thr) sval[n] = s[j], sidx[n] = static_cast<int32_t>(g + j + offset), ++n;
  }
  return n;
}

#if defined(__SSE2__) && !defined(__CUDACC__)
// float on x86-64: four scores a step, a movemask of the comparison, the set
// bits appended (the same scores and order as the portable loop).
template <bool kMax>
int64_t append_above(const float* dot, const float* aa, float lam, int64_t begin, int64_t end, float thr,
                     int64_t offset, float* sval, int32_t* sidx, int64_t n, float& mx) {
  const __m128 vl = _mm_set1_ps(lam), vt = _mm_set1_ps(thr);
  __m128 vm = _mm_set1_ps(mx);
  int64_t k = begin;
  alignas(16) float sc[4];
  for (; k + 4 <= end; k += 4) {
    const __m128 d = _mm_loadu_ps(dot + k);
    const __m128 v = _mm_mul_ps(vl, _mm_sub_ps(_mm_add_ps(d, d), _mm_loadu_ps(aa + k)));
    if constexpr (kMax) vm = _mm_max_ps(vm, v);
    int m = _mm_movemask_ps(_mm_cmpgt_ps(v, vt));
    if (m) {
      _mm_store_ps(sc, v);
      do {
        const int j = __builtin_ctz(m);
        sval[n] = sc[j], sidx[n] = static_cast<int32_t>(k + j + offset), ++n;
        m &= m - 1;
      } while (m);
    }
  }
  if constexpr (kMax) {
    alignas(16) float mm[4];
    _mm_store_ps(mm, vm);
    mx = std::max(std::max(mm[0], mm[1]), std::max(mm[2], mm[3]));
  }
  // The last end − k < 4 entries: the portable loop.
  return append_above<kMax, float>(dot, aa, lam, k, end, thr, offset, sval, sidx, n, mx);
}
#endif

// The policy's steps 2–4 for one chunk row from the bound b (the buffer's n
// candidates in sval / sidx); with kMax, also the chunk's largest score into
// mx.  Returns the new count, or −1 when the row overflowed (then, with
// kMax, mx still covers the whole chunk).
template <bool kMax, typename T>
int64_t scan_chunk_row(const T* dot, const T* aa, T lam, int64_t cols, int64_t offset, T slack, T& b, int64_t n,
                       int64_t max_candidates, T* sval, int32_t* sidx, T& mx) {
  for (int64_t base = 0; base < cols; base += kThreads) {
    const int64_t end = std::min(cols, base + kThreads);
    n = append_above<kMax>(dot, aa, lam, base, end, b - slack, offset, sval, sidx, n, mx);  // n ≤ max_candidates: fits
    if (n > max_candidates) {
      b = host_tau_above(sval, n, b);
      n = compact_above(sval, sidx, n, b - slack);
      if (n > max_candidates) {
        if constexpr (kMax) mx = std::max(mx, chunk_max(dot + end, aa + end, lam, cols - end));
        return -1;
      }
    }
  }
  if (n > 0) {
    b = host_tau_above(sval, n, b);
    n = compact_above(sval, sidx, n, b - slack);
  }
  return n;
}

// One row of one chunk: `dot` holds x_b·a_k and `aa` ‖a_k‖² for the chunk's
// columns.  buf_idx / buf_val hold the row's `count` candidates (max_candidates slots);
// sval / sidx are the caller's scratch of max_candidates + kThreads slots.
// Bound and candidates come out as the policy above gives them.
//
// Step 1 needs the chunk's max before the first tile.  Once a row has a
// finite bound (every chunk after its first), the max rarely moves it: the
// chunk is scanned from the bound alone while its max is taken in the same
// pass, and scanned again from max − 1 only when that is higher (the result
// is then what the policy gives, at one pass a chunk instead of two).
template <typename T>
void select_chunk_row(const T* dot, const T* aa, T lam, int64_t cols, int64_t offset, T slack, int32_t* buf_idx,
                      T* buf_val, int32_t& count, T& bound, int64_t max_candidates, T* sval, int32_t* sidx) {
  if (count < 0) return;  // overflowed in an earlier chunk
  T b = bound, mx = -std::numeric_limits<T>::infinity();
  // The scan works on a copy of the row's buffer in the scratch (a rescan starts from the same copy).
  auto scan_from = [&](auto with_max, T start) {
    std::copy(buf_val, buf_val + count, sval);
    std::copy(buf_idx, buf_idx + count, sidx);
    b = start;
    return scan_chunk_row<decltype(with_max)::value>(dot, aa, lam, cols, offset, slack, b, count, max_candidates,
                                                     sval, sidx, mx);
  };
  int64_t n = -1;
  if (bound > -std::numeric_limits<T>::infinity()) {
    n = scan_from(std::true_type{}, bound);
    if (mx - T(1) > bound) n = scan_from(std::false_type{}, mx - T(1));  // the max raises the bound: rescan from it
  } else {  // a row's first chunk: no bound yet, so the max comes first
    n = scan_from(std::false_type{}, chunk_max(dot, aa, lam, cols) - T(1));
  }
  if (n < 0) {
    count = -1;
    return;
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
