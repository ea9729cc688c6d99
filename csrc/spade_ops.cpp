// The torch binding of the spade ops: schemas (TORCH_LIBRARY, declared once
// here) and their CPU implementations — C++ with OpenMP (at::parallel_for),
// the same algorithms as the CUDA kernels in csrc/include/spade, whose
// implementations are registered by csrc/cuda/spade_cuda.cpp when the
// extension is built with CUDA.  Fake (meta) implementations are registered in
// Python (spade_kernels/_ext.py).
//
// spade::sparsemax_rows(Tensor scores) -> (Tensor out, Tensor tau)
//   Exact sparsemax over the last dimension of a 2-D tensor: only entries
//   above max − 1 can be in the support (DESIGN.md §2 fact 2); they are
//   collected, then Michelot's iteration from max − 1 gives the exact τ
//   (fact 4), all relative to the row maximum.  Rows with NaN or +inf, or only
//   −inf, give NaN.
// spade::select_candidates(x, A, aa, lam, margin, chunk, cap) -> (cand, overflow)
//   K-chunked GEMM-form scores + the selection epilogue (select.cuh).
// spade::exact_codes(x, A, lam, cand) -> (values, indices, support_size, D)
//   Exact sparsemax codes over candidate sets (exact.cuh).
// spade::support_jacobian, gather_matmul, gather_dot, gather_sq_dist,
// scatter_matmul: the products over a support (sparse.cuh).
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include "binding.h"
#include "cpu/exact.h"
#include "cpu/select.h"
#include "cpu/sparse.h"

#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

namespace {

template <typename scalar_t>
void sparsemax_row(const scalar_t* s, scalar_t* out, scalar_t* tau, int64_t cols,
                   std::vector<double>& cand) {
  double m = -std::numeric_limits<double>::infinity();
  bool undefined = false;
  for (int64_t k = 0; k < cols; ++k) {
    const double v = static_cast<double>(s[k]);
    if (std::isnan(v) || v == std::numeric_limits<double>::infinity()) undefined = true;
    if (v > m) m = v;
  }
  if (undefined || !(m > -std::numeric_limits<double>::infinity())) {
    *tau = std::numeric_limits<scalar_t>::quiet_NaN();
    for (int64_t k = 0; k < cols; ++k) out[k] = std::numeric_limits<scalar_t>::quiet_NaN();
    return;
  }
  cand.clear();
  for (int64_t k = 0; k < cols; ++k) {
    const double v = static_cast<double>(s[k]) - m;
    if (v > -1.0) cand.push_back(v);
  }
  // τ relative to m: Michelot from max − 1, the same iteration as the SpaDE ops' (cand holds the maximum, 0).
  const double t = spade::cpu::buffer_tau(cand.data(), static_cast<int64_t>(cand.size()));
  *tau = static_cast<scalar_t>(t + m);
  for (int64_t k = 0; k < cols; ++k) {
    const double v = static_cast<double>(s[k]) - m - t;
    out[k] = static_cast<scalar_t>(v > 0.0 ? v : 0.0);
  }
}

std::tuple<at::Tensor, at::Tensor> sparsemax_rows_cpu(const at::Tensor& scores) {
  TORCH_CHECK(scores.dim() == 2, "spade::sparsemax_rows: scores must be 2-D, got ", scores.dim(), "-D");
  TORCH_CHECK(scores.scalar_type() == at::kFloat || scores.scalar_type() == at::kDouble,
              "spade::sparsemax_rows: scores must be float32 or float64 on the CPU, got ", scores.scalar_type());
  const at::Tensor s = scores.contiguous();
  at::Tensor out = at::empty_like(s);
  at::Tensor tau = at::empty({s.size(0)}, s.options());
  const int64_t rows = s.size(0), cols = s.size(1);
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "sparsemax_rows_cpu", [&] {
    const scalar_t* sp = s.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    scalar_t* tp = tau.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      std::vector<double> cand;
      for (int64_t r = begin; r < end; ++r) sparsemax_row(sp + r * cols, op + r * cols, tp + r, cols, cand);
    });
  });
  return {out, tau};
}

// ---------------------------------------------------------------------------
// Candidate selection and exact codes
// ---------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> select_candidates_cpu(const at::Tensor& x, const at::Tensor& A,
                                                         const at::Tensor& aa, double lam, const at::Tensor& margin,
                                                         int64_t chunk, int64_t cap) {
  spade::binding::check_select_candidates(x, A, aa, lam, margin, chunk, cap);
  auto chunk_fn = [](const at::Tensor& S, int64_t offset, const at::Tensor& margin, at::Tensor& buf_idx,
                     at::Tensor& buf_val, at::Tensor& count, at::Tensor& bound, int64_t cap) {
    const int64_t rows = S.size(0), cols = S.size(1);
    AT_DISPATCH_FLOATING_TYPES(S.scalar_type(), "select_chunk_cpu", [&] {
      const scalar_t* sp = S.data_ptr<scalar_t>();
      const scalar_t* mp = margin.data_ptr<scalar_t>();
      int32_t* ip = buf_idx.data_ptr<int32_t>();
      scalar_t* vp = buf_val.data_ptr<scalar_t>();
      int32_t* cp = count.data_ptr<int32_t>();
      scalar_t* bp = bound.data_ptr<scalar_t>();
      at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r)
          spade::cpu::select_chunk_row(sp + r * cols, cols, offset, mp[r], ip + r * cap, vp + r * cap, cp[r], bp[r],
                                       cap);
      });
    });
  };
  return spade::binding::select_candidates(x, A, aa, lam, margin, chunk, cap, chunk_fn);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> exact_codes_cpu(const at::Tensor& x_, const at::Tensor& A_,
                                                                           double lam, const at::Tensor& cand_) {
  at::Tensor x, A, cand;
  std::tie(x, A, cand) = spade::binding::check_exact_codes(x_, A_, lam, cand_);
  spade::binding::check_index_range(cand, -1, A.size(0), "exact_codes", "cand");
  const int64_t B = x.size(0), d = x.size(1), W = cand.size(1);
  at::Tensor values = at::empty({B, W}, x.options());
  at::Tensor indices = at::empty({B, W}, cand.options());
  at::Tensor size = at::empty({B}, cand.options());
  at::Tensor dist = at::empty({B, W}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "exact_codes_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* ap = A.data_ptr<scalar_t>();
    const int64_t* cp = cand.data_ptr<int64_t>();
    scalar_t* vp = values.data_ptr<scalar_t>();
    int64_t* ip = indices.data_ptr<int64_t>();
    int64_t* sp = size.data_ptr<int64_t>();
    scalar_t* dp = dist.data_ptr<scalar_t>();
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> D, s;
      std::vector<std::pair<scalar_t, int64_t>> support;
      for (int64_t r = begin; r < end; ++r)
        spade::cpu::exact_codes_row(xp + r * d, ap, d, cp + r * W, W, static_cast<scalar_t>(lam), vp + r * W,
                                    ip + r * W, sp[r], dp + r * W, D, s, support);
    });
  });
  return {values, indices, size, dist};
}

// ---------------------------------------------------------------------------
// Products over a support
// ---------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> support_jacobian_cpu(const at::Tensor& z_, const std::optional<at::Tensor>& grad_z_,
                                                        const at::Tensor& D_, const std::optional<at::Tensor>& grad_D_,
                                                        const at::Tensor& lam_) {
  at::Tensor z, D, lam; std::optional<at::Tensor> grad_z, grad_D;
  std::tie(z, grad_z, D, grad_D, lam) = spade::binding::check_support_jacobian(z_, grad_z_, D_, grad_D_, lam_);
  const int64_t B = z.size(0), C = z.size(1);
  at::Tensor G = at::empty_like(z);
  at::Tensor lam_rows = at::empty({B}, z.options());
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "support_jacobian_cpu", [&] {
    const scalar_t* gz = grad_z ? grad_z->data_ptr<scalar_t>() : nullptr;
    const scalar_t* gD = grad_D ? grad_D->data_ptr<scalar_t>() : nullptr;
    const scalar_t l = lam.data_ptr<scalar_t>()[0];
    const scalar_t* zp = z.data_ptr<scalar_t>();
    const scalar_t* Dp = D.data_ptr<scalar_t>();
    scalar_t* Gp = G.data_ptr<scalar_t>();
    scalar_t* lp = lam_rows.data_ptr<scalar_t>();
    at::parallel_for(0, B, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r)
        spade::cpu::support_jacobian_row(zp + r * C, gz ? gz + r * C : nullptr, Dp + r * C, gD ? gD + r * C : nullptr,
                                         l, C, Gp + r * C, lp[r]);
    });
  });
  return {G, lam_rows};
}

at::Tensor gather_matmul_cpu(const at::Tensor& weights, const at::Tensor& indices, const at::Tensor& M_) {
  at::Tensor w, idx, M;
  std::tie(w, idx, M) = spade::binding::check_gather(weights, indices, M_, "gather_matmul", "weights", true);
  spade::binding::check_index_range(idx, 0, M.size(0), "gather_matmul", "indices");
  const int64_t B = idx.size(0), C = idx.size(1), d = M.size(1);
  at::Tensor out = at::empty({B, d}, M.options());
  AT_DISPATCH_FLOATING_TYPES(M.scalar_type(), "gather_matmul_cpu", [&] {
    const scalar_t* wp = w.data_ptr<scalar_t>();
    const int64_t* ip = idx.data_ptr<int64_t>();
    const scalar_t* mp = M.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) spade::cpu::gather_matmul_row(wp + r * C, ip + r * C, C, mp, d, op + r * d);
    });
  });
  return out;
}

template <bool kSqDist>
at::Tensor gather_reduce_cpu(const at::Tensor& X_, const at::Tensor& indices, const at::Tensor& M_, const char* op) {
  at::Tensor X, idx, M;
  std::tie(X, idx, M) = spade::binding::check_gather(X_, indices, M_, op, kSqDist ? "x" : "G", false);
  spade::binding::check_index_range(idx, 0, M.size(0), op, "indices");
  const int64_t B = idx.size(0), C = idx.size(1), d = M.size(1);
  at::Tensor out = at::empty({B, C}, M.options());
  AT_DISPATCH_FLOATING_TYPES(M.scalar_type(), "gather_reduce_cpu", [&] {
    const scalar_t* xp = X.data_ptr<scalar_t>();
    const int64_t* ip = idx.data_ptr<int64_t>();
    const scalar_t* mp = M.data_ptr<scalar_t>();
    scalar_t* outp = out.data_ptr<scalar_t>();
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r)
        spade::cpu::gather_reduce_row<scalar_t, kSqDist>(xp + r * d, ip + r * C, C, mp, d, outp + r * C);
    });
  });
  return out;
}

at::Tensor gather_dot_cpu(const at::Tensor& G, const at::Tensor& indices, const at::Tensor& M) {
  return gather_reduce_cpu<false>(G, indices, M, "gather_dot");
}

at::Tensor gather_sq_dist_cpu(const at::Tensor& x, const at::Tensor& indices, const at::Tensor& M) {
  return gather_reduce_cpu<true>(x, indices, M, "gather_sq_dist");
}

at::Tensor scatter_matmul_cpu(const at::Tensor& weights, const at::Tensor& indices, const at::Tensor& X_,
                              int64_t n_rows) {
  at::Tensor w, idx, X;
  std::tie(w, idx, X) = spade::binding::check_scatter(weights, indices, X_, n_rows);
  spade::binding::check_index_range(idx, 0, n_rows, "scatter_matmul", "indices");
  at::Tensor order, seg;
  std::tie(order, seg) = spade::binding::latent_segments(idx, n_rows);
  const int64_t C = idx.size(1), d = X.size(1);
  at::Tensor out = at::empty({n_rows, d}, X.options());
  AT_DISPATCH_FLOATING_TYPES(X.scalar_type(), "scatter_matmul_cpu", [&] {
    const scalar_t* wp = w.data_ptr<scalar_t>();
    const int64_t* op = order.data_ptr<int64_t>();
    const int64_t* sp = seg.data_ptr<int64_t>();
    const scalar_t* xp = X.data_ptr<scalar_t>();
    scalar_t* outp = out.data_ptr<scalar_t>();
    at::parallel_for(0, n_rows, 64, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k)
        spade::cpu::scatter_matmul_row(wp, op, sp[k], sp[k + 1], C, xp, d, outp + k * d);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(spade, m) {
  m.def("sparsemax_rows(Tensor scores) -> (Tensor, Tensor)");
  m.def(
      "select_candidates(Tensor x, Tensor A, Tensor aa, float lam, Tensor margin, int chunk, int cap)"
      " -> (Tensor, Tensor)");
  m.def("exact_codes(Tensor x, Tensor A, float lam, Tensor cand) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("support_jacobian(Tensor z, Tensor? grad_z, Tensor D, Tensor? grad_D, Tensor lam) -> (Tensor, Tensor)");
  m.def("gather_matmul(Tensor weights, Tensor indices, Tensor M) -> Tensor");
  m.def("gather_dot(Tensor G, Tensor indices, Tensor M) -> Tensor");
  m.def("gather_sq_dist(Tensor x, Tensor indices, Tensor M) -> Tensor");
  m.def("scatter_matmul(Tensor weights, Tensor indices, Tensor X, int n_rows) -> Tensor");
}

TORCH_LIBRARY_IMPL(spade, CPU, m) {
  m.impl("sparsemax_rows", &sparsemax_rows_cpu);
  m.impl("select_candidates", &select_candidates_cpu);
  m.impl("exact_codes", &exact_codes_cpu);
  m.impl("support_jacobian", &support_jacobian_cpu);
  m.impl("gather_matmul", &gather_matmul_cpu);
  m.impl("gather_dot", &gather_dot_cpu);
  m.impl("gather_sq_dist", &gather_sq_dist_cpu);
  m.impl("scatter_matmul", &scatter_matmul_cpu);
}
