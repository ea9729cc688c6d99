// Shared by the CPU (spade_ops.cpp) and CUDA (cuda/spade_cuda.cpp) halves of
// the torch binding: argument checks that name the op, the argument, what was
// expected and what was given, and the device-independent drivers.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <limits>
#include <optional>
#include <tuple>

namespace spade::binding {

inline void check_matrix(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.dim() == 2, "spade::", op, ": ", name, " must be 2-D, got shape ", t.sizes());
}

inline void check_floating(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, "spade::", op, ": ", name,
              " must be float32 or float64, got ", t.scalar_type());
}

inline void check_like(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name,
                       const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), "spade::", op, ": ", name, " is on ", t.device(), " but ", ref_name,
              " is on ", ref.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "spade::", op, ": ", name, " has dtype ", t.scalar_type(),
              " but ", ref_name, " has dtype ", ref.scalar_type());
}

inline void check_indices(const at::Tensor& idx, const at::Tensor& ref, const char* op, const char* name) {
  check_matrix(idx, op, name);
  TORCH_CHECK(idx.scalar_type() == at::kLong, "spade::", op, ": ", name, " must be int64, got ",
              idx.scalar_type());
  TORCH_CHECK(idx.device() == ref.device(), "spade::", op, ": ", name, " is on ", idx.device(), " but the data is on ",
              ref.device());
}

inline void check_rows(const at::Tensor& t, int64_t rows, const char* op, const char* name) {
  TORCH_CHECK(t.size(0) == rows, "spade::", op, ": ", name, " has ", t.size(0), " rows, expected ", rows);
}

inline void check_same_shape(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name,
                             const char* ref_name) {
  TORCH_CHECK(t.sizes() == ref.sizes(), "spade::", op, ": ", name, " has shape ", t.sizes(), " but ", ref_name,
              " has shape ", ref.sizes());
}

// CPU only (a device-side check would synchronise): indices in [lo, n).
inline void check_index_range(const at::Tensor& idx, int64_t lo, int64_t n, const char* op, const char* name) {
  if (idx.numel() == 0) return;
  const int64_t mn = idx.min().item<int64_t>(), mx = idx.max().item<int64_t>();
  TORCH_CHECK(mn >= lo && mx < n, "spade::", op, ": ", name, " must lie in [", lo, ", ", n, "), got values in [", mn,
              ", ", mx, "]");
}

inline void check_lambda(double lam, const char* op) {
  TORCH_CHECK(std::isfinite(lam) && lam > 0.0, "spade::", op, ": lam must be finite and > 0, got ", lam);
}

// Smallest candidate buffer: one tile of a 256-thread block must fit.
constexpr int64_t kMinCap = 256;

// Checks of select_candidates (both devices, before anything else runs).
inline void check_select_candidates(const at::Tensor& x, const at::Tensor& A, const at::Tensor& aa, double lam,
                                    const at::Tensor& margin, int64_t chunk, int64_t cap) {
  constexpr const char* op = "select_candidates";
  check_matrix(x, op, "x");
  check_matrix(A, op, "A");
  check_floating(x, op, "x");
  check_like(A, x, op, "A", "x");
  check_like(aa, x, op, "aa", "x");
  check_like(margin, x, op, "margin", "x");
  TORCH_CHECK(A.size(1) == x.size(1), "spade::", op, ": A has ", A.size(1), " columns but x has ", x.size(1));
  TORCH_CHECK(aa.dim() == 1 && aa.size(0) == A.size(0), "spade::", op, ": aa must have shape (", A.size(0),
              ",), got ", aa.sizes());
  TORCH_CHECK(margin.dim() == 1 && margin.size(0) == x.size(0), "spade::", op, ": margin must have shape (",
              x.size(0), ",), got ", margin.sizes());
  TORCH_CHECK(chunk >= 1, "spade::", op, ": chunk must be >= 1, got ", chunk);
  TORCH_CHECK(cap >= kMinCap && cap <= std::numeric_limits<int32_t>::max(), "spade::", op, ": cap must be >= ",
              kMinCap, ", got ", cap);
  TORCH_CHECK(A.size(0) <= std::numeric_limits<int32_t>::max(), "spade::", op, ": at most 2^31 - 1 prototypes");
  check_lambda(lam, op);
}

// select_candidates: K-chunked GEMM-form scores s' = λ(2·x·aᵀ − ‖a‖²) through
// at::addmm (a library GEMM: MKL/OpenBLAS on the CPU, cuBLAS on the GPU), each
// chunk reduced to candidates by `select_chunk(S, offset, margin, buf_idx,
// buf_val, count, bound, cap)`.  Arguments are checked by
// check_select_candidates first.  Returns the candidates (B, cap; −1 = empty
// slot) and the rows that overflowed `cap` (B, bool).  Live memory:
// O(B·chunk + B·cap).
template <typename SelectChunk>
std::tuple<at::Tensor, at::Tensor> select_candidates(const at::Tensor& x, const at::Tensor& A, const at::Tensor& aa,
                                                     double lam, const at::Tensor& margin, int64_t chunk, int64_t cap,
                                                     SelectChunk&& select_chunk) {
  const int64_t B = x.size(0), K = A.size(0);
  const auto opts = x.options();
  at::Tensor buf_idx = at::empty({B, cap}, opts.dtype(at::kInt));
  at::Tensor buf_val = at::empty({B, cap}, opts);
  at::Tensor count = at::zeros({B}, opts.dtype(at::kInt));
  at::Tensor bound = at::full({B}, -std::numeric_limits<double>::infinity(), opts);
  const at::Tensor xc = x.contiguous(), mc = margin.contiguous();
  for (int64_t c0 = 0; c0 < K && B > 0; c0 += chunk) {
    const int64_t c1 = std::min(K, c0 + chunk);
    const at::Tensor S = at::addmm(aa.slice(0, c0, c1), xc, A.slice(0, c0, c1).t(), -lam, 2.0 * lam).contiguous();
    select_chunk(S, c0, mc, buf_idx, buf_val, count, bound, cap);
  }
  const at::Tensor slots = at::arange(cap, opts.dtype(at::kLong));
  at::Tensor cand = buf_idx.to(at::kLong).masked_fill_(slots.unsqueeze(0) >= count.unsqueeze(1), -1);
  return {cand, count.lt(0)};
}

// Checks of exact_codes; returns contiguous (x, A, cand).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> check_exact_codes(const at::Tensor& x, const at::Tensor& A,
                                                                        double lam, const at::Tensor& cand) {
  constexpr const char* op = "exact_codes";
  check_matrix(x, op, "x");
  check_matrix(A, op, "A");
  check_floating(x, op, "x");
  check_like(A, x, op, "A", "x");
  TORCH_CHECK(A.size(1) == x.size(1), "spade::", op, ": A has ", A.size(1), " columns but x has ", x.size(1));
  check_indices(cand, x, op, "cand");
  check_rows(cand, x.size(0), op, "cand");
  check_lambda(lam, op);
  return {x.contiguous(), A.contiguous(), cand.contiguous()};
}

// Checks of support_jacobian; returns contiguous (z, grad_z, D, grad_D, lam)
// with the gradients cast to z's dtype (absent ones stay empty).
inline std::tuple<at::Tensor, std::optional<at::Tensor>, at::Tensor, std::optional<at::Tensor>, at::Tensor>
check_support_jacobian(const at::Tensor& z, const std::optional<at::Tensor>& grad_z, const at::Tensor& D,
                       const std::optional<at::Tensor>& grad_D, const at::Tensor& lam) {
  constexpr const char* op = "support_jacobian";
  check_matrix(z, op, "z");
  check_floating(z, op, "z");
  check_like(D, z, op, "D", "z");
  check_same_shape(D, z, op, "D", "z");
  TORCH_CHECK(lam.numel() == 1, "spade::", op, ": lam must hold one value, got shape ", lam.sizes());
  TORCH_CHECK(lam.device() == z.device(), "spade::", op, ": lam is on ", lam.device(), " but z is on ", z.device());
  auto prep = [&](const std::optional<at::Tensor>& g, const char* name) -> std::optional<at::Tensor> {
    if (!g.has_value()) return std::nullopt;
    TORCH_CHECK(g->device() == z.device(), "spade::", op, ": ", name, " is on ", g->device(), " but z is on ",
                z.device());
    check_same_shape(*g, z, op, name, "z");
    return g->to(z.scalar_type()).contiguous();
  };
  return {z.contiguous(), prep(grad_z, "grad_z"), D.contiguous(), prep(grad_D, "grad_D"),
          lam.to(z.scalar_type()).reshape({1}).contiguous()};
}

// Checks of a gather over rows of M (gather_matmul, gather_dot,
// gather_sq_dist): `lhs` is (B, C) weights or (B, d) rows; returns contiguous
// (lhs cast to M's dtype, idx, M).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> check_gather(const at::Tensor& lhs, const at::Tensor& idx,
                                                                   const at::Tensor& M, const char* op,
                                                                   const char* lhs_name, bool lhs_is_weights) {
  check_matrix(lhs, op, lhs_name);
  check_matrix(M, op, "M");
  check_floating(M, op, "M");
  check_indices(idx, M, op, "indices");
  TORCH_CHECK(lhs.device() == M.device(), "spade::", op, ": ", lhs_name, " is on ", lhs.device(), " but M is on ",
              M.device());
  check_rows(lhs, idx.size(0), op, lhs_name);
  if (lhs_is_weights) {
    check_same_shape(lhs, idx, op, lhs_name, "indices");
  } else {
    TORCH_CHECK(lhs.size(1) == M.size(1), "spade::", op, ": ", lhs_name, " has ", lhs.size(1),
                " columns but M has ", M.size(1));
  }
  return {lhs.to(M.scalar_type()).contiguous(), idx.contiguous(), M.contiguous()};
}

// Checks of scatter_matmul; returns contiguous (weights cast to X's dtype, idx, X).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> check_scatter(const at::Tensor& w, const at::Tensor& idx,
                                                                    const at::Tensor& X, int64_t n_rows) {
  constexpr const char* op = "scatter_matmul";
  check_matrix(w, op, "weights");
  check_matrix(X, op, "X");
  check_floating(X, op, "X");
  check_indices(idx, X, op, "indices");
  TORCH_CHECK(w.device() == X.device(), "spade::", op, ": weights is on ", w.device(), " but X is on ", X.device());
  check_same_shape(w, idx, op, "weights", "indices");
  check_rows(X, idx.size(0), op, "X");
  TORCH_CHECK(n_rows >= 0, "spade::", op, ": n_rows must be >= 0, got ", n_rows);
  return {w.to(X.scalar_type()).contiguous(), idx.contiguous(), X.contiguous()};
}

// The entries of idx (B, C) in latent order, and each latent's segment
// [seg[k], seg[k + 1]) of it (n_rows + 1 offsets).  Indices outside
// [0, n_rows) fall outside every segment.  No host synchronisation.
inline std::tuple<at::Tensor, at::Tensor> latent_segments(const at::Tensor& idx, int64_t n_rows) {
  at::Tensor sorted, order;
  std::tie(sorted, order) = at::sort(idx.reshape({-1}), /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const at::Tensor bounds = at::arange(n_rows + 1, idx.options());
  return {order.contiguous(), at::searchsorted(sorted, bounds).contiguous()};
}

}  // namespace spade::binding
