// Shared by every kernel of csrc/include/spade, on the host (the C++/OpenMP
// implementations) and on the device (the CUDA kernels): the constants, and
// Michelot's threshold iteration, written once.  Raw C++, no torch headers.
//
// Each op's header (sparsemax.h, select.h, exact.h, sparse.h) holds its CPU
// implementation (one row at a time; the binding runs rows in parallel) and,
// when compiled by nvcc, its CUDA kernel and launcher: the two versions of
// one algorithm side by side.  The mathematics is docs/design.md.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>

#ifdef __CUDACC__
#define SPADE_HD __host__ __device__ __forceinline__
#else
#define SPADE_HD inline
#endif

namespace spade {

// Threads per block of every CUDA kernel, and the tile width of the
// candidate selection on both devices (a tile is appended to the buffer
// before it is compacted, so both devices overflow at the same point).
constexpr int kThreads = 256;
// Safety cap on Michelot's iteration (it converges in a handful of steps:
// the count of values above τ strictly falls every step).
constexpr int kMichelotMaxIters = 1024;
// CUDA kernels opt in to more than 48 KiB of dynamic shared memory when their
// dynamic size plus this bound on their static shared memory (≤ 32 values +
// 32 ints of scratch) passes 48 KiB, the default per-block limit.
constexpr size_t kStaticSharedBound = 1024;
constexpr size_t kDefaultSharedLimit = 48 * 1024;

SPADE_HD int64_t pow2_at_least(int64_t n) {
  int64_t p = 1;
  while (p < n) p <<= 1;
  return p;
}

// Dynamic shared memory of the CUDA select and exact kernels (the binding
// checks it against the device's limit before launching).
template <typename T>
inline size_t select_chunk_shared_bytes(int64_t max_candidates) {
  return static_cast<size_t>(max_candidates + kThreads) * (sizeof(T) + sizeof(int32_t));
}
template <typename T>
inline size_t exact_codes_shared_bytes(int64_t width) {
  return static_cast<size_t>(pow2_at_least(width)) * (sizeof(T) + sizeof(int32_t)) +
         static_cast<size_t>(width) * sizeof(T);
}

// The sparsemax threshold τ of a set of values whose maximum is m, by
// Michelot's iteration from max − 1 ≤ τ (design facts 2 and 4): relative to
// m, t ← (Σ_{v−m>t} (v − m) − 1) / #{v − m > t}, which rises monotonically to
// the exact τ − m from any start t0 ≤ τ − m, and does not rise from a start
// above it.  `sum_above(t, sum, cnt)` adds Σ (v − m) and the count over the
// values with v − m > t: a loop on the host, a block reduction on the device
// (every thread of the block calls this, and gets the same t).  Returns t,
// relative to m; michelot_tau returns τ.
template <typename T, typename SumAbove>
SPADE_HD T michelot_relative(SumAbove&& sum_above, T t0) {
  T t = t0;
  for (int it = 0; it < kMichelotMaxIters; ++it) {
    T sum = T(0), cnt = T(0);
    sum_above(t, sum, cnt);
    const T next = (sum - T(1)) / (cnt > T(1) ? cnt : T(1));
    if (!(next > t)) break;  // converged
    t = next;
  }
  return t;
}

template <typename T, typename SumAbove>
SPADE_HD T michelot_tau(T m, SumAbove&& sum_above) {
  return michelot_relative(sum_above, T(-1)) + m;
}

// Σ_i (x_i − a_i)² (kSqDist) or Σ_i x_i·a_i over [0, d) on the host, in T, with
// eight independent partial sums: the compiler vectorises it (the order of
// the additions is fixed, so results are reproducible), and the error of a
// sum of d terms stays within the d·ε bound the precision contract allows.
template <typename T, bool kSqDist>
inline T host_reduce(const T* x, const T* a, int64_t d) {
  T acc[8] = {T(0), T(0), T(0), T(0), T(0), T(0), T(0), T(0)};
  int64_t i = 0;
  for (; i + 8 <= d; i += 8) {
    for (int j = 0; j < 8; ++j) {
      if constexpr (kSqDist) {
        const T diff = x[i + j] - a[i + j];
        acc[j] += diff * diff;
      } else {
        acc[j] += x[i + j] * a[i + j];
      }
    }
  }
  for (int j = 0; i < d; ++i, ++j) {
    if constexpr (kSqDist) {
      const T diff = x[i] - a[i];
      acc[j] += diff * diff;
    } else {
      acc[j] += x[i] * a[i];
    }
  }
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

// Σ (v_j − m) and the count over the v_j with v_j − m > t, into sum and cnt:
// one vectorised pass (OpenMP SIMD; the order of its additions is the
// compiler's, within the d·ε the precision contract allows, as the GPU's
// block reductions have their own).  Not inlined: one vectorised copy, which
// every caller's loop reaches.
template <typename T>
__attribute__((noinline)) void host_sum_above(const T* __restrict__ v, int64_t n, T m, T t, T& sum, T& cnt) {
  T s = T(0), c = T(0);
#pragma omp simd reduction(+ : s, c)
  for (int64_t j = 0; j < n; ++j) {
    const T r = v[j] - m;
    s += r > t ? r : T(0);
    c += r > t ? T(1) : T(0);
  }
  sum += s, cnt += c;
}

// The largest of v[0, n) (n ≥ 1, no NaN).
template <typename T>
inline T host_max(const T* v, int64_t n) {
  T m = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) m = v[j] > m ? v[j] : m;
  return m;
}

// τ of v[0, n) (n ≥ 1) on the host.
template <typename T>
inline T host_tau(const T* v, int64_t n) {
  const T m = host_max(v, n);
  return michelot_tau(m, [&](T t, T& sum, T& cnt) { host_sum_above(v, n, m, t, sum, cnt); });
}

// max(floor, τ of v[0, n)) for a floor the caller already holds (a bound
// ≤ τ of a superset): Michelot's iteration started from the floor when that
// is above max − 1, so a buffer whose τ the floor nearly is takes a pass or
// two instead of one per step from max − 1.  The floor itself when the
// iteration does not rise from it.
template <typename T>
inline T host_tau_above(const T* v, int64_t n, T floor) {
  const T m = host_max(v, n);
  const T t0 = floor - m > T(-1) ? floor - m : T(-1);
  const T t = michelot_relative([&](T t, T& sum, T& cnt) { host_sum_above(v, n, m, t, sum, cnt); }, t0);
  if (t0 == T(-1)) return std::max(floor, t + m);  // started from max − 1: t + m is τ
  if (t > t0) return std::max(floor, t + m);       // rose from the floor to τ
  return floor;                                    // did not rise: the floor is τ up to rounding
}

}  // namespace spade
