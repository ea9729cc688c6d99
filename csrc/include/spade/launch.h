// Host launchers of the spade CUDA kernels: declarations only, includable from
// plain C++ (the torch binding, csrc/cuda/spade_cuda.cpp) without nvcc.
//
// Each launcher enqueues its kernel(s) on `stream` and returns the launch
// error.  Pointers are device pointers to contiguous row-major arrays unless
// a leading dimension is given.  The definitions live in the .cuh headers
// beside this one; csrc/kernels/*.cu instantiate them for the types below
// (float and double for the SpaDE ops; float, bfloat16 and float16 scores
// for sparsemax_rows).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace spade {

// Shared memory the launchers below request (dynamic, per block), so a
// binding can check it against the device's limit before launching.
inline int64_t pow2_at_least(int64_t n) {
  int64_t p = 1;
  while (p < n) p <<= 1;
  return p;
}
template <typename T>
inline size_t select_chunk_shared_bytes(int64_t cap, int64_t threads = 256) {
  return static_cast<size_t>(cap + threads) * (sizeof(T) + sizeof(int32_t));
}
template <typename T>
inline size_t exact_codes_shared_bytes(int64_t width) {
  return static_cast<size_t>(pow2_at_least(width)) * (sizeof(T) + sizeof(int32_t)) +
         static_cast<size_t>(width) * sizeof(T);
}

// (sparsemax.cuh) Exact sparsemax of each row of `scores` (rows × cols,
// leading dimension ld): τ per row into `tau` (float), and the projection
// into `out` (same layout) when out is non-null.
template <typename T>
cudaError_t sparsemax_rows(const T* scores, T* out, float* tau, int64_t rows, int64_t cols, int64_t ld,
                           cudaStream_t stream);

// (select.cuh) Selection epilogue for one chunk of GEMM-form scores
// s'[b, k] = λ(2·x_b·a_k − ‖a_k‖²), k ∈ [offset, offset + cols).  Keeps every
// entry that can still be in row b's sparsemax support in a per-row buffer of
// `cap` slots (buf_idx / buf_val, rows × cap, count[b] used), raising
// bound[b] (a lower bound of τ_b) on the way; margin[b] is the rounding slack
// of the scores.  A row whose buffer cannot hold its candidates gets
// count[b] = −1 and is skipped by later chunks (the caller resolves it).
template <typename T>
cudaError_t select_chunk(const T* scores, int64_t rows, int64_t cols, int64_t ld, int64_t offset,
                         const T* margin, int32_t* buf_idx, T* buf_val, int32_t* count, T* bound, int cap,
                         cudaStream_t stream);

// (exact.cuh) Exact sparsemax codes over candidate sets: for row b and
// candidate slot j (cand[b, j] in [0, n_a); −1, or any index outside that
// range, is an empty slot), D = ‖x_b − A[cand]‖²
// computed directly, s = −λ·(D − min_j D), τ exact; writes the support sorted
// by value descending into values / indices / dist (rows × width, zero
// padded) and its size into support_size.
template <typename T>
cudaError_t exact_codes(const T* x, const T* A, int64_t rows, int64_t n_a, int64_t d, const int64_t* cand,
                        int64_t width, T lam, T* values, int64_t* indices, int64_t* support_size, T* dist,
                        cudaStream_t stream);

// (sparse.cuh) Backward through sparsemax and s = −λD on each row's support
// (z > 0): G = −λ·(g − mean_S g) + grad_D on S, 0 elsewhere, and
// lam_rows[b] = −Σ_S (g − mean_S g)·D.  grad_z / grad_D may be null (zero);
// lam is a device pointer to one value.
template <typename T>
cudaError_t support_jacobian(const T* z, const T* grad_z, const T* D, const T* grad_D, const T* lam,
                             int64_t rows, int64_t width, T* G, T* lam_rows, cudaStream_t stream);

// (sparse.cuh) out[b] = Σ_j w[b, j] · M[idx[b, j]]  (rows × d; M is n_m × d).
template <typename T>
cudaError_t gather_matmul(const T* w, const int64_t* idx, int64_t rows, int64_t width, const T* M, int64_t n_m,
                          int64_t d, T* out, cudaStream_t stream);

// (sparse.cuh) out[b, j] = ⟨X[b], M[idx[b, j]]⟩ (kSqDist = false) or
// ‖X[b] − M[idx[b, j]]‖² (kSqDist = true); rows × width.
template <typename T, bool kSqDist>
cudaError_t gather_reduce(const T* X, const int64_t* idx, int64_t rows, int64_t width, const T* M, int64_t n_m,
                          int64_t d, T* out, cudaStream_t stream);

// (sparse.cuh) The sparse-transpose product out[k] = Σ_{(b, j): idx[b, j] = k}
// w[b, j] · X[b] (n_out × d), without atomics: `order` lists the flat
// positions b·width + j sorted by idx, and seg[k] .. seg[k + 1] is latent
// k's range in it (seg has n_out + 1 entries; entries with an index outside
// [0, n_out) fall in no segment and are dropped).  Deterministic.
template <typename T>
cudaError_t scatter_matmul(const T* w, const int64_t* order, const int64_t* seg, int64_t width, const T* X,
                           int64_t d, int64_t n_out, T* out, cudaStream_t stream);

}  // namespace spade
