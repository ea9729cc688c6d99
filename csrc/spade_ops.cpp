// torch binding of the spade ops: schemas (TORCH_LIBRARY) and CPU kernels.
//
// spade::sparsemax_rows(Tensor scores) -> (Tensor out, Tensor tau)
//   Exact sparsemax over the last dimension of a 2-D float/double tensor:
//   out = max(s − τ, 0), τ per row (float32 for half inputs, else the input
//   dtype).  Same algorithm as the CUDA kernel (csrc/include/spade/sparsemax.cuh):
//   only entries above max − 1 can be in the support (DESIGN.md §2 fact 2);
//   they are collected, then Michelot's iteration from max − 1 gives the exact
//   τ (fact 4), all relative to the row maximum.  Rows with NaN or +inf, or
//   only −inf, give NaN.  Rows run in parallel with OpenMP (at::parallel_for).
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

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
  double t = -1.0;  // relative to m: a lower bound of τ
  for (;;) {
    double sum = 0.0, cnt = 0.0;
    for (double v : cand)
      if (v > t) sum += v, cnt += 1.0;
    const double next = (sum - 1.0) / cnt;  // cnt ≥ 1: the maximum is above t
    if (!(next > t)) break;
    t = next;
  }
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

}  // namespace

TORCH_LIBRARY(spade, m) {
  m.def("sparsemax_rows(Tensor scores) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(spade, CPU, m) {
  m.impl("sparsemax_rows", &sparsemax_rows_cpu);
}
