// CUDA implementations of the spade ops (schemas: csrc/spade_ops.cpp).
//
// The thin half of the binding that needs a CUDA build of torch: checks
// (shared with the CPU half, csrc/binding.h), output allocation, the current
// stream, and a call to a launcher of csrc/include/spade (declared in
// spade/launch.h, compiled by nvcc from csrc/kernels/*.cu without torch
// headers).  The score GEMM of select_candidates is at::addmm (cuBLAS).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "../binding.h"
#include "spade/launch.h"

namespace {

cudaStream_t current_stream() {
  return c10::cuda::getCurrentCUDAStream().stream();
}

// float32 and float64, the dtypes the SpaDE kernels are instantiated for.
template <typename Fn>
void dispatch_float(at::ScalarType dtype, const char* op, Fn&& fn) {
  if (dtype == at::kFloat) {
    fn(float{});
  } else if (dtype == at::kDouble) {
    fn(double{});
  } else {
    TORCH_CHECK(false, "spade::", op, ": expected float32 or float64, got ", dtype);
  }
}

// Raises unless `bytes` of dynamic shared memory (plus the kernels' small
// static scratch) fit one block on the current device.
void check_shared_memory(size_t bytes, const char* op, const char* what, int64_t value) {
  int device = 0, optin = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  TORCH_CHECK(bytes + 1024 <= static_cast<size_t>(optin), "spade::", op, ": ", what, " = ", value, " needs ", bytes,
              " bytes of shared memory per block; this GPU allows ", optin, " (use a smaller ", what, ")");
}

std::tuple<at::Tensor, at::Tensor> sparsemax_rows_cuda(const at::Tensor& scores) {
  TORCH_CHECK(scores.dim() == 2, "spade::sparsemax_rows: scores must be 2-D, got ", scores.dim(), "-D");
  const at::ScalarType dtype = scores.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "spade::sparsemax_rows: CUDA scores must be float32, bfloat16 or float16, got ", dtype);
  const c10::cuda::CUDAGuard guard(scores.device());
  const at::Tensor s = scores.contiguous();
  at::Tensor out = at::empty_like(s);
  at::Tensor tau = at::empty({s.size(0)}, s.options().dtype(at::kFloat));
  const int64_t rows = s.size(0), cols = s.size(1);
  cudaError_t err;
  if (dtype == at::kFloat) {
    err = spade::sparsemax_rows<float>(s.data_ptr<float>(), out.data_ptr<float>(), tau.data_ptr<float>(), rows, cols,
                                       cols, current_stream());
  } else if (dtype == at::kBFloat16) {
    err = spade::sparsemax_rows<__nv_bfloat16>(reinterpret_cast<const __nv_bfloat16*>(s.data_ptr()),
                                               reinterpret_cast<__nv_bfloat16*>(out.data_ptr()),
                                               tau.data_ptr<float>(), rows, cols, cols, current_stream());
  } else {
    err = spade::sparsemax_rows<__half>(reinterpret_cast<const __half*>(s.data_ptr()),
                                        reinterpret_cast<__half*>(out.data_ptr()), tau.data_ptr<float>(), rows, cols,
                                        cols, current_stream());
  }
  C10_CUDA_CHECK(err);
  return {out, tau};  // τ is float32 for every input dtype here
}

std::tuple<at::Tensor, at::Tensor> select_candidates_cuda(const at::Tensor& x, const at::Tensor& A,
                                                          const at::Tensor& aa, double lam, const at::Tensor& margin,
                                                          int64_t chunk, int64_t cap) {
  // Checks first, so a CPU tensor among CUDA ones gets the named error, not the guard's.
  spade::binding::check_select_candidates(x, A, aa, lam, margin, chunk, cap);
  const c10::cuda::CUDAGuard guard(x.device());
  check_shared_memory(x.scalar_type() == at::kDouble ? spade::select_chunk_shared_bytes<double>(cap)
                                                     : spade::select_chunk_shared_bytes<float>(cap),
                      "select_candidates", "cap", cap);
  auto chunk_fn = [](const at::Tensor& S, int64_t offset, const at::Tensor& margin, at::Tensor& buf_idx,
                     at::Tensor& buf_val, at::Tensor& count, at::Tensor& bound, int64_t cap) {
    dispatch_float(S.scalar_type(), "select_candidates", [&](auto zero) {
      using T = decltype(zero);
      C10_CUDA_CHECK(spade::select_chunk<T>(S.data_ptr<T>(), S.size(0), S.size(1), S.size(1), offset,
                                            margin.data_ptr<T>(), buf_idx.data_ptr<int32_t>(), buf_val.data_ptr<T>(),
                                            count.data_ptr<int32_t>(), bound.data_ptr<T>(), static_cast<int>(cap),
                                            current_stream()));
    });
  };
  return spade::binding::select_candidates(x, A, aa, lam, margin, chunk, cap, chunk_fn);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> exact_codes_cuda(const at::Tensor& x_,
                                                                            const at::Tensor& A_, double lam,
                                                                            const at::Tensor& cand_) {
  at::Tensor x, A, cand;
  std::tie(x, A, cand) = spade::binding::check_exact_codes(x_, A_, lam, cand_);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t B = x.size(0), d = x.size(1), W = cand.size(1);
  check_shared_memory(x.scalar_type() == at::kDouble ? spade::exact_codes_shared_bytes<double>(W)
                                                     : spade::exact_codes_shared_bytes<float>(W),
                      "exact_codes", "the candidate width", W);
  at::Tensor values = at::empty({B, W}, x.options());
  at::Tensor indices = at::empty({B, W}, cand.options());
  at::Tensor size = at::empty({B}, cand.options());
  at::Tensor dist = at::empty({B, W}, x.options());
  dispatch_float(x.scalar_type(), "exact_codes", [&](auto zero) {
    using T = decltype(zero);
    C10_CUDA_CHECK(spade::exact_codes<T>(x.data_ptr<T>(), A.data_ptr<T>(), B, A.size(0), d, cand.data_ptr<int64_t>(), W,
                                         static_cast<T>(lam), values.data_ptr<T>(), indices.data_ptr<int64_t>(),
                                         size.data_ptr<int64_t>(), dist.data_ptr<T>(), current_stream()));
  });
  return {values, indices, size, dist};
}

std::tuple<at::Tensor, at::Tensor> support_jacobian_cuda(const at::Tensor& z_,
                                                         const std::optional<at::Tensor>& grad_z_,
                                                         const at::Tensor& D_,
                                                         const std::optional<at::Tensor>& grad_D_,
                                                         const at::Tensor& lam_) {
  at::Tensor z, D, lam;
  std::optional<at::Tensor> grad_z, grad_D;
  std::tie(z, grad_z, D, grad_D, lam) = spade::binding::check_support_jacobian(z_, grad_z_, D_, grad_D_, lam_);
  const c10::cuda::CUDAGuard guard(z.device());
  at::Tensor G = at::empty_like(z);
  at::Tensor lam_rows = at::empty({z.size(0)}, z.options());
  dispatch_float(z.scalar_type(), "support_jacobian", [&](auto zero) {
    using T = decltype(zero);
    C10_CUDA_CHECK(spade::support_jacobian<T>(
        z.data_ptr<T>(), grad_z ? grad_z->data_ptr<T>() : nullptr, D.data_ptr<T>(),
        grad_D ? grad_D->data_ptr<T>() : nullptr, lam.data_ptr<T>(), z.size(0), z.size(1), G.data_ptr<T>(),
        lam_rows.data_ptr<T>(), current_stream()));
  });
  return {G, lam_rows};
}

at::Tensor gather_matmul_cuda(const at::Tensor& weights, const at::Tensor& indices, const at::Tensor& M_) {
  at::Tensor w, idx, M;
  std::tie(w, idx, M) = spade::binding::check_gather(weights, indices, M_, "gather_matmul", "weights", true);
  const c10::cuda::CUDAGuard guard(M.device());
  at::Tensor out = at::empty({idx.size(0), M.size(1)}, M.options());
  dispatch_float(M.scalar_type(), "gather_matmul", [&](auto zero) {
    using T = decltype(zero);
    C10_CUDA_CHECK(spade::gather_matmul<T>(w.data_ptr<T>(), idx.data_ptr<int64_t>(), idx.size(0), idx.size(1),
                                           M.data_ptr<T>(), M.size(0), M.size(1), out.data_ptr<T>(),
                                           current_stream()));
  });
  return out;
}

template <bool kSqDist>
at::Tensor gather_reduce_cuda(const at::Tensor& X_, const at::Tensor& indices, const at::Tensor& M_, const char* op) {
  at::Tensor X, idx, M;
  std::tie(X, idx, M) = spade::binding::check_gather(X_, indices, M_, op, kSqDist ? "x" : "G", false);
  const c10::cuda::CUDAGuard guard(M.device());
  at::Tensor out = at::empty({idx.size(0), idx.size(1)}, M.options());
  dispatch_float(M.scalar_type(), op, [&](auto zero) {
    using T = decltype(zero);
    C10_CUDA_CHECK((spade::gather_reduce<T, kSqDist>(X.data_ptr<T>(), idx.data_ptr<int64_t>(), idx.size(0),
                                                     idx.size(1), M.data_ptr<T>(), M.size(0), M.size(1),
                                                     out.data_ptr<T>(), current_stream())));
  });
  return out;
}

at::Tensor gather_dot_cuda(const at::Tensor& G, const at::Tensor& indices, const at::Tensor& M) {
  return gather_reduce_cuda<false>(G, indices, M, "gather_dot");
}

at::Tensor gather_sq_dist_cuda(const at::Tensor& x, const at::Tensor& indices, const at::Tensor& M) {
  return gather_reduce_cuda<true>(x, indices, M, "gather_sq_dist");
}

at::Tensor scatter_matmul_cuda(const at::Tensor& weights, const at::Tensor& indices, const at::Tensor& X_,
                               int64_t n_rows) {
  at::Tensor w, idx, X;
  std::tie(w, idx, X) = spade::binding::check_scatter(weights, indices, X_, n_rows);
  const c10::cuda::CUDAGuard guard(X.device());
  at::Tensor order, seg;
  std::tie(order, seg) = spade::binding::latent_segments(idx, n_rows);
  at::Tensor out = at::empty({n_rows, X.size(1)}, X.options());
  dispatch_float(X.scalar_type(), "scatter_matmul", [&](auto zero) {
    using T = decltype(zero);
    C10_CUDA_CHECK(spade::scatter_matmul<T>(w.data_ptr<T>(), order.data_ptr<int64_t>(), seg.data_ptr<int64_t>(),
                                            idx.size(1), X.data_ptr<T>(), X.size(1), n_rows, out.data_ptr<T>(),
                                            current_stream()));
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(spade, CUDA, m) {
  m.impl("sparsemax_rows", &sparsemax_rows_cuda);
  m.impl("select_candidates", &select_candidates_cuda);
  m.impl("exact_codes", &exact_codes_cuda);
  m.impl("support_jacobian", &support_jacobian_cuda);
  m.impl("gather_matmul", &gather_matmul_cuda);
  m.impl("gather_dot", &gather_dot_cuda);
  m.impl("gather_sq_dist", &gather_sq_dist_cuda);
  m.impl("scatter_matmul", &scatter_matmul_cuda);
}
