// CPU twin of spade/select.cuh: the same selection of candidates from one
// chunk of GEMM-form scores, for one row (rows run in parallel in the caller).
//
// The row keeps a buffer of `cap` candidates and a bound ≤ τ(row).  Entries
// above bound − slack are appended; when the buffer is full its own τ (a
// lower bound of the row's, DESIGN.md §2 fact 3) raises the bound and what
// falls below it is dropped; a row that still does not fit overflows
// (count = −1).  The chunk ends with the same τ-and-compact step.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>

namespace spade::cpu {

constexpr int kMichelotMaxIters = 1024;

// Sparsemax τ of v[0, n) (n ≥ 1), relative to its maximum: Michelot from max − 1.
template <typename T>
T buffer_tau(const T* v, int64_t n) {
  T m = -std::numeric_limits<T>::infinity();
  for (int64_t j = 0; j < n; ++j) m = std::max(m, v[j]);
  T t = T(-1);
  for (int it = 0; it < kMichelotMaxIters; ++it) {
    T sum = T(0), cnt = T(0);
    for (int64_t j = 0; j < n; ++j) {
      const T r = v[j] - m;
      if (r > t) sum += r, cnt += T(1);
    }
    const T next = (sum - T(1)) / std::max(cnt, T(1));
    if (!(next > t)) break;
    t = next;
  }
  return t + m;
}

// Keeps the entries of (v, idx)[0, n) above thr, in order; returns how many.
template <typename T>
int64_t compact_above(T* v, int32_t* idx, int64_t n, T thr) {
  int64_t out = 0;
  for (int64_t j = 0; j < n; ++j)
    if (v[j] > thr) v[out] = v[j], idx[out] = idx[j], ++out;
  return out;
}

template <typename T>
void select_chunk_row(const T* s, int64_t cols, int64_t offset, T slack, int32_t* buf_idx, T* buf_val,
                      int32_t& count, T& bound, int64_t cap) {
  int64_t n = count;
  if (n < 0) return;  // overflowed in an earlier chunk
  T mx = -std::numeric_limits<T>::infinity();
  for (int64_t k = 0; k < cols; ++k) mx = std::max(mx, s[k]);
  T b = std::max(bound, mx - T(1));
  for (int64_t k = 0; k < cols; ++k) {
    const T v = s[k];
    if (!(v > b - slack)) continue;
    if (n == cap) {
      b = std::max(b, buffer_tau(buf_val, n));
      n = compact_above(buf_val, buf_idx, n, b - slack);
      if (!(v > b - slack)) continue;
      if (n == cap) {
        count = -1;
        return;
      }
    }
    buf_val[n] = v;
    buf_idx[n] = static_cast<int32_t>(k + offset);
    ++n;
  }
  if (n > 0) {
    b = std::max(b, buffer_tau(buf_val, n));
    n = compact_above(buf_val, buf_idx, n, b - slack);
  }
  count = static_cast<int32_t>(n);
  bound = b;
}

}  // namespace spade::cpu
