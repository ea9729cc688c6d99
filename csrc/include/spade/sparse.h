// Products over a support: the sparse backward of the encoder and the sparse
// decoder (docs/design.md, facts 5–6).  Each costs O(B·C·d) for a support of
// width C, never O(B·K·d).
//
//   support_jacobian   sparsemax Jacobian + chain through s = −λD: G and ∂λ rows
//   gather_matmul      out[b] = Σ_j w[b, j] · M[idx[b, j]]        (decoder, ∂x)
//   gather_reduce      ⟨X[b], M[idx]⟩ or ‖X[b] − M[idx]‖²          (∂z, exact D)
//   scatter_matmul     out[k] = Σ_{idx[b,j] = k} w[b, j] · X[b]    (∂W_dec)
//                      or Σ_{idx[b,j] = k} w[b, j] · (X[b] − M[k])  (∂prototypes, design fact 6)
//
// The sparse transpose is a segmented sum over the entries sorted by latent
// (a stable sort on the GPU, the same order by a counting sort on the host:
// LatentSlots), so it is deterministic and needs no atomics.  On both
// devices an index outside [0, n_m) makes the gathers' output NaN where it is
// used (instead of reading out of bounds) and falls in no segment of the
// scatter (dropped); no check synchronises the GPU.
//
// Host: cpu::*_row, one output row (the binding runs rows in parallel), and
// the gathered reductions latent by latent (cpu::gather_reduce_latents: each
// row of M read once).  Device (nvcc): the kernels and launchers below.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

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

// The slots f = b·width + j of the rows [r0, r1) of a (rows, width) index matrix
// grouped by latent, each group in slot order (the order of a stable sort of
// the indices, which the GPU's sparse transpose uses): latent c's slots are
// slot[e] for e in [seg[c], seg[c+1]), of batch row row[e] (both counted from
// the matrix's first row).  Indices outside [0, n) belong to no latent; slots
// with skip(f) true are left out.  A counting sort, O((r1 − r0)·width + n);
// callers take rows in chunks of about kChunkSlots slots, so its arrays stay
// small whatever B is.
constexpr int64_t kChunkSlots = int64_t(1) << 20;

inline int64_t chunk_rows(int64_t width) {
  return std::max<int64_t>(1, kChunkSlots / std::max<int64_t>(width, 1));
}

struct LatentSlots {
  std::vector<int64_t> seg, slot, row;

  template <typename Skip>
  LatentSlots(const int64_t* idx, int64_t r0, int64_t r1, int64_t width, int64_t n, Skip&& skip) : seg(n + 1, 0) {
    auto in = [&](int64_t f) { return idx[f] >= 0 && idx[f] < n && !skip(f); };
    for (int64_t f = r0 * width; f < r1 * width; ++f)
      if (in(f)) ++seg[idx[f] + 1];
    for (int64_t c = 0; c < n; ++c) seg[c + 1] += seg[c];
    slot.resize(seg[n]);
    row.resize(seg[n]);
    std::vector<int64_t> next(seg.begin(), seg.end() - 1);
    for (int64_t b = r0; b < r1; ++b)
      for (int64_t f = b * width; f < (b + 1) * width; ++f)
        if (in(f)) {
          const int64_t e = next[idx[f]]++;
          slot[e] = f, row[e] = b;
        }
  }
  LatentSlots(const int64_t* idx, int64_t r0, int64_t r1, int64_t width, int64_t n)
      : LatentSlots(idx, r0, r1, width, n, [](int64_t) { return false; }) {}
};

// Whether rows of a (rows, d) matrix are finite, each tested once, when first asked.
template <typename T>
class FiniteRows {
 public:
  FiniteRows(const T* m, int64_t rows, int64_t d) : m_(m), d_(d), known_(rows, -1) {}
  bool operator()(int64_t r) {
    if (known_[r] < 0) {
      bool finite = true;
      for (int64_t i = 0; i < d_; ++i) finite = finite && std::abs(m_[r * d_ + i]) <= std::numeric_limits<T>::max();
      known_[r] = finite ? 1 : 0;
    }
    return known_[r] == 1;
  }

 private:
  const T* m_;
  int64_t d_;
  std::vector<int8_t> known_;
};

// The slots a weighted product can leave out: weight exactly 0 against a
// finite row (0·v = 0 adds nothing, up to the sign of a zero sum; against a
// non-finite row it is NaN, kept).  The zero-weight slots are mostly the codes'
// padding (index 0, weight 0), which would otherwise all land on latent 0.
template <typename T>
struct ZeroWeightOnFiniteRow {
  const T* w;
  FiniteRows<T>& finite;
  bool by_latent;  // the row tested: the slot's latent (gather) or its batch row (scatter)
  const int64_t* idx;
  int64_t width;
  bool operator()(int64_t f) const {
    return w[f] == T(0) && finite(by_latent ? idx[f] : f / width);  // (a zero weight's slot only)
  }
};

// Whether the host's latent-major loops pay: a counting sort costs O(slots + n),
// so with few slots per latent (a handful of rows against many latents) the
// row-by-row loops, which never touch the unused latents, are cheaper; and a
// matrix of n rows of row_bytes that fits in a core's L2 (2 MiB here) is read
// from cache either way (at (2048, 128, 512) the row-by-row loops measured
// ~4% faster).
inline bool latent_major(int64_t slots, int64_t n, int64_t row_bytes) {
  return slots >= n / 8 && n * row_bytes > (int64_t(2) << 20);
}

// out[j] = ⟨x, M[idx[j]]⟩ or ‖x − M[idx[j]]‖² (accumulated in T, vectorised);
// `empty` for an index outside [0, n_m).  One row, for few slots (latent_major).
template <typename T, bool kSqDist>
void gather_reduce_row(const T* x, const int64_t* idx, int64_t width, const T* M, int64_t n_m, int64_t d, T empty,
                       T* out) {
  for (int64_t j = 0; j < width; ++j)
    out[j] = idx[j] < 0 || idx[j] >= n_m ? empty
             : j > 0 && idx[j] == idx[j - 1] ? out[j - 1]  // a repeat (the codes' padding)
                                             : host_reduce<T, kSqDist>(x, M + idx[j] * d, d);
}

// out[f] = ⟨X_b, M_c⟩ or ‖X_b − M_c‖² (host_reduce) for every slot f = b·width + j
// of latents [c0, c1) (LatentSlots), latent by latent: each
// row M_c is read once and met by every row of X that points at it (the rows of
// X, a few MB, stay in cache; reading M_c once per slot streamed B·width·d
// values of M from memory: benchmarks/NOTES.md, "Latent-major gathers").  Slots
// of no latent are left as they are.  Callers split the latents across threads.
template <typename T, bool kSqDist>
void gather_reduce_latents(const T* X, const T* M, int64_t d, const LatentSlots& by, int64_t c0, int64_t c1,
                           T* out) {
  for (int64_t c = c0; c < c1; ++c)
    for (int64_t e = by.seg[c]; e < by.seg[c + 1]; ++e)
      // A row's slots of one latent are adjacent here (slot order): the repeats (the codes'
      // padding, index 0, up to width − L0 of them a row) copy the first one's value.
      out[by.slot[e]] = e > by.seg[c] && by.row[e] == by.row[e - 1]
                            ? out[by.slot[e - 1]]
                            : host_reduce<T, kSqDist>(X + by.row[e] * d, M + c * d, d);
}

// out[b] = Σ_j w[b, j] · M[idx[b, j]] for the rows b of [r0, r1), latent by
// latent (LatentSlots): each row M_c is read once per call
// and added into the rows that point at it, whose outputs stay in cache.  A
// row's terms are added in latent order whatever [r0, r1) is, so the result
// does not depend on how callers split the rows across threads.  A row with an
// index outside [0, n_m) is NaN.
template <typename T>
void gather_matmul_latents(const T* w, const int64_t* idx, int64_t width, const T* M, int64_t n_m, int64_t d,
                           const LatentSlots& by, int64_t r0, int64_t r1, T* out) {
  std::fill(out + r0 * d, out + r1 * d, T(0));
  for (int64_t c = 0; c < n_m; ++c) {
    const T* m = M + c * d;
    for (int64_t e = by.seg[c]; e < by.seg[c + 1]; ++e) {
      const int64_t b = by.row[e];
      if (b < r0 || b >= r1) continue;
      const T wf = w[by.slot[e]];
      T* o = out + b * d;
      for (int64_t i = 0; i < d; ++i) o[i] += wf * m[i];
    }
  }
  for (int64_t b = r0; b < r1; ++b)
    for (int64_t j = 0; j < width; ++j)
      if (idx[b * width + j] < 0 || idx[b * width + j] >= n_m) {
        std::fill(out + b * d, out + (b + 1) * d, std::numeric_limits<T>::quiet_NaN());
        break;
      }
}

// out[0, d) = Σ_e w[slot[e]] · X[row[e]] over latent k's slots (LatentSlots), in
// order, added to out (zero: to zeros; a later chunk of rows adds to an earlier one's).
// With m (row k of M, or null), the first chunk (zero) starts the row from
// −wsum · m instead of zeros, wsum the latent's weight sum over the whole batch
// (the caller's one pass): the ∂prototypes' 2·(ΣG)·a_k term, which a separate
// pass read and wrote over the whole K×d gradient again.  Every latent gets
// it, empty ones too: 0·inf is NaN, as in the dense gradient.
template <typename T>
void scatter_matmul_row(const T* w, const LatentSlots& by, int64_t k, const T* X, int64_t d, bool zero, const T* m,
                        T wsum, T* out) {
  if (zero && m != nullptr)
    for (int64_t i = 0; i < d; ++i) out[i] = -wsum * m[i];
  else if (zero)
    for (int64_t i = 0; i < d; ++i) out[i] = T(0);
  for (int64_t e = by.seg[k]; e < by.seg[k + 1]; ++e) {
    const T we = w[by.slot[e]];
    const T* xr = X + by.row[e] * d;
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

// Grid (n_out, ⌈d / 256⌉): latent k sums its segment of the sorted entries
// (with M: minus the segment's weight sum times M[k], as on the host).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    scatter_matmul_kernel(const T* __restrict__ w, const int64_t* __restrict__ order, const int64_t* __restrict__ seg,
                          int64_t width, const T* __restrict__ X, const T* __restrict__ M, int64_t d,
                          T* __restrict__ out) {
  const int64_t k = blockIdx.x;
  const int64_t col = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (col >= d) return;
  T acc = T(0), wsum = T(0);
  for (int64_t e = seg[k]; e < seg[k + 1]; ++e) {
    const int64_t flat = order[e];
    acc += w[flat] * X[(flat / width) * d + col];
    wsum += w[flat];
  }
  out[k * d + col] = M != nullptr ? acc - wsum * M[k * d + col] : acc;
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

// M: null, or (n_out, d) for the ∂prototypes form.
template <typename T>
cudaError_t scatter_matmul(const T* w, const int64_t* order, const int64_t* seg, int64_t width, const T* X,
                           const T* M, int64_t d, int64_t n_out, T* out, cudaStream_t stream) {
  if (n_out == 0 || d == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(n_out), detail::blocks_for(d, kThreads));
  scatter_matmul_kernel<T><<<grid, kThreads, 0, stream>>>(w, order, seg, width, X, M, d, out);
  return cudaGetLastError();
}

#endif  // __CUDACC__

}  // namespace spade
