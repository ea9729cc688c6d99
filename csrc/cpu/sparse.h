// CPU twins of spade/sparse.cuh: the products over a support, one output row
// at a time (the caller runs rows in parallel).  Indices are checked by the
// caller.
#pragma once

#include <cstdint>

namespace spade::cpu {

// G and the ∂λ share of one row (see support_jacobian in spade/launch.h).
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

// out[0, d) = Σ_j w[j] · M[idx[j]]
template <typename T>
void gather_matmul_row(const T* w, const int64_t* idx, int64_t width, const T* M, int64_t d, T* out) {
  for (int64_t i = 0; i < d; ++i) out[i] = T(0);
  for (int64_t j = 0; j < width; ++j) {
    const T wj = w[j];
    const T* m = M + idx[j] * d;
    for (int64_t i = 0; i < d; ++i) out[i] += wj * m[i];
  }
}

// out[j] = ⟨x, M[idx[j]]⟩ or ‖x − M[idx[j]]‖² (float64 accumulation).
template <typename T, bool kSqDist>
void gather_reduce_row(const T* x, const int64_t* idx, int64_t width, const T* M, int64_t d, T* out) {
  for (int64_t j = 0; j < width; ++j) {
    const T* m = M + idx[j] * d;
    double acc = 0.0;
    for (int64_t i = 0; i < d; ++i) {
      if constexpr (kSqDist) {
        const double diff = static_cast<double>(x[i]) - static_cast<double>(m[i]);
        acc += diff * diff;
      } else {
        acc += static_cast<double>(x[i]) * static_cast<double>(m[i]);
      }
    }
    out[j] = static_cast<T>(acc);
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

}  // namespace spade::cpu
