// The torch binding of the spade ops, written once for both devices.
//
// The schemas, fake implementations and documented Python wrappers are in
// spade_kernels/ops.py.  Here, per op: the argument checks (messages name the
// op, the argument, what was expected and what was given), output
// allocation, and the call into its kernel header (csrc/include/spade) —
// rows in parallel (at::parallel_for) for CPU tensors, the CUDA launcher on
// the current stream for CUDA tensors.  Each driver is a template on
// kCuda; ops_cpu.cpp registers the <false> instantiations for the CPU,
// ops_cuda.cu (compiled by nvcc) the <true> ones for CUDA, both from the one
// list SPADE_OPS below.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdlib>
#include <limits>
#include <mutex>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "spade/common.h"
#include "spade/exact.h"
#include "spade/select.h"
#include "spade/sparse.h"
#include "spade/sparsemax.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

#ifdef __CUDACC__
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

// Every op, once: the registration files expand X(name) for each.
#define SPADE_OPS(X)   \
  X(sparsemax_rows)    \
  X(select_candidates) \
  X(exact_codes)       \
  X(support_jacobian)  \
  X(gather_matmul)     \
  X(gather_dot)        \
  X(gather_sq_dist)    \
  X(scatter_matmul)

namespace spade::binding {

// -- devices ----------------------------------------------------------------

#ifdef __CUDACC__
inline cudaStream_t stream() {
  return c10::cuda::getCurrentCUDAStream().stream();
}
// The device guard of a CUDA op (nothing on the CPU).
template <bool kCuda>
struct Guard {
  explicit Guard(const at::Tensor& t) : guard(t.device()) {}
  c10::cuda::CUDAGuard guard;
};
template <>
struct Guard<false> {
  explicit Guard(const at::Tensor&) {}
};
// Raises unless `bytes` of dynamic shared memory (plus the kernels' small
// static scratch) fit one block on the current device.
inline void check_shared_memory(size_t bytes, const char* op, const char* what, int64_t value) {
  int device = 0, optin = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  TORCH_CHECK(bytes + kStaticSharedBound <= static_cast<size_t>(optin), "spade_kernels::", op, ": ", what, " = ", value,
              " needs ", bytes, " bytes of shared memory per block; this GPU allows ", optin, " (use a smaller ",
              what, ")");
}
#define SPADE_CUDA_LAUNCH(call) C10_CUDA_CHECK(call)
#else
template <bool kCuda>
struct Guard {
  explicit Guard(const at::Tensor&) {}
};
#define SPADE_CUDA_LAUNCH(call) TORCH_CHECK(false, "spade: this translation unit was built without CUDA")
#endif

// Latents per task of the CPU's latent-major loops (a latent's work is its
// few slots' d-length reductions).
constexpr int64_t kLatentGrain = 256;

// Runs body(r) for every row r in [0, rows), in parallel.
template <typename Body>
void for_rows(int64_t rows, int64_t grain, Body&& body) {
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) body(r);
  });
}

// Freed large CPU outputs kept for the next request of the same size.  A
// training step's K×d gradients are freed when the optimizer's zero_grad sets
// them to None and asked for again, the same sizes, by the next backward; a
// fresh block's first write pays the kernel's zeroing of every page (~5 ms a
// 48 MiB gradient on huge pages, benchmarks/NOTES.md, "Freed outputs kept"),
// a kept one does not.  At most `limit` bytes are kept, the oldest freed first
// when a newer block needs the room: SPADE_KERNELS_OUTPUT_CACHE_MB (default
// 256; 0 keeps nothing).  spade_kernels.release_cached_outputs() frees them.
// A process-lifetime object (never destroyed: deleters run until exit).
class OutputCache {
 public:
  static OutputCache& get() {
    static OutputCache* cache = new OutputCache();
    return *cache;
  }

  // A kept block of exactly `bytes`, or nullptr.
  void* take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto it = blocks_.begin(); it != blocks_.end(); ++it)
      if (it->second == bytes) {
        void* p = it->first;
        held_ -= bytes;
        blocks_.erase(it);
        return p;
      }
    return nullptr;
  }

  // Keeps a freed block if it fits under the limit (dropping older ones), else frees it.
  void give(void* p, size_t bytes) {
    std::vector<void*> drop;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (bytes > limit_) {
        drop.push_back(p);
      } else {
        while (held_ + bytes > limit_) {
          drop.push_back(blocks_.front().first);
          held_ -= blocks_.front().second;
          blocks_.erase(blocks_.begin());
        }
        blocks_.emplace_back(p, bytes);
        held_ += bytes;
      }
    }
    for (void* q : drop) std::free(q);
  }

  // Frees every kept block; returns the bytes freed.
  int64_t release() {
    std::vector<std::pair<void*, size_t>> drop;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      drop.swap(blocks_);
      held_ = 0;
    }
    int64_t freed = 0;
    for (auto& b : drop) std::free(b.first), freed += static_cast<int64_t>(b.second);
    return freed;
  }

  int64_t held() {
    std::lock_guard<std::mutex> lock(mutex_);
    return static_cast<int64_t>(held_);
  }

 private:
  OutputCache() {
    const char* env = std::getenv("SPADE_KERNELS_OUTPUT_CACHE_MB");
    char* end = nullptr;
    const long long mb = env != nullptr && *env != '\0' ? std::strtoll(env, &end, 10) : 256;
    TORCH_CHECK(env == nullptr || *env == '\0' || (end != nullptr && *end == '\0' && mb >= 0),
                "SPADE_KERNELS_OUTPUT_CACHE_MB must be a whole number of MiB >= 0, got '", env, "'");
    limit_ = static_cast<size_t>(mb) << 20;
  }

  std::mutex mutex_;
  std::vector<std::pair<void*, size_t>> blocks_;  // oldest first
  size_t held_ = 0;
  size_t limit_ = 0;
};

// A large CPU output (≥ 2 MiB: the K×d gradients of the sparse transpose):
// a kept block of its size (OutputCache), else a fresh one on transparent
// huge pages where Linux offers them (THP "always" or "madvise"): its first
// write then takes a few hundred page faults, not one per 4 KiB page.  A
// fresh K×d float32 gradient at K = 16384, d = 768 took ~16 ms to write on
// 4 KiB pages and ~3.5 ms on huge pages, most of a sparse transpose's time
// (benchmarks/NOTES.md, "Page faults").  PyTorch's CPU allocator does this for
// every large tensor under THP_MEM_ALLOC_ENABLE=1; here only for these
// outputs, whatever the environment.  Elsewhere (CUDA, small outputs, other
// systems, a refused allocation): at::empty.
inline at::Tensor large_empty(at::IntArrayRef sizes, const at::TensorOptions& opts) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr size_t kHugePage = size_t(2) << 20;
  const size_t nbytes = static_cast<size_t>(c10::multiply_integers(sizes)) * opts.dtype().itemsize();
  if (opts.device().is_cpu() && nbytes >= kHugePage) {
    const size_t padded = (nbytes + kHugePage - 1) / kHugePage * kHugePage;
    void* p = OutputCache::get().take(padded);
    if (p == nullptr) {
      void* fresh = nullptr;
      if (posix_memalign(&fresh, kHugePage, padded) == 0) {
        madvise(fresh, padded, MADV_HUGEPAGE);  // advice: ignored where THP is off
        p = fresh;
      }
    }
    if (p != nullptr)
      return at::from_blob(p, sizes, [padded](void* q) { OutputCache::get().give(q, padded); }, opts);
  }
#endif
  return at::empty(sizes, opts);
}

// float32 and float64: the dtypes the SpaDE kernels compute in.
template <typename Fn>
void dispatch_float(at::ScalarType dtype, const char* op, Fn&& fn) {
  if (dtype == at::kFloat) {
    fn(float{});
  } else if (dtype == at::kDouble) {
    fn(double{});
  } else {
    TORCH_CHECK(false, "spade_kernels::", op, ": expected float32 or float64, got ", dtype);
  }
}

// -- checks -----------------------------------------------------------------

inline void check_matrix(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.dim() == 2, "spade_kernels::", op, ": ", name, " must be 2-D, got shape ", t.sizes());
}

inline void check_floating(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, "spade_kernels::", op, ": ", name,
              " must be float32 or float64, got ", t.scalar_type());
}

inline void check_like(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name,
                       const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), "spade_kernels::", op, ": ", name, " is on ", t.device(), " but ", ref_name,
              " is on ", ref.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "spade_kernels::", op, ": ", name, " has dtype ", t.scalar_type(),
              " but ", ref_name, " has dtype ", ref.scalar_type());
}

inline void check_indices(const at::Tensor& idx, const at::Tensor& ref, const char* op, const char* name) {
  check_matrix(idx, op, name);
  TORCH_CHECK(idx.scalar_type() == at::kLong, "spade_kernels::", op, ": ", name, " must be int64, got ",
              idx.scalar_type());
  TORCH_CHECK(idx.device() == ref.device(), "spade_kernels::", op, ": ", name, " is on ", idx.device(),
              " but the data is on ", ref.device());
}

inline void check_rows(const at::Tensor& t, int64_t rows, const char* op, const char* name) {
  TORCH_CHECK(t.size(0) == rows, "spade_kernels::", op, ": ", name, " has ", t.size(0), " rows, expected ", rows);
}

inline void check_same_shape(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name,
                             const char* ref_name) {
  TORCH_CHECK(t.sizes() == ref.sizes(), "spade_kernels::", op, ": ", name, " has shape ", t.sizes(), " but ", ref_name,
              " has shape ", ref.sizes());
}

inline void check_lambda(double lam, const char* op) {
  TORCH_CHECK(std::isfinite(lam) && lam > 0.0, "spade_kernels::", op, ": lam must be finite and > 0, got ", lam);
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
  TORCH_CHECK(lhs.device() == M.device(), "spade_kernels::", op, ": ", lhs_name, " is on ", lhs.device(),
              " but M is on ", M.device());
  check_rows(lhs, idx.size(0), op, lhs_name);
  if (lhs_is_weights) {
    check_same_shape(lhs, idx, op, lhs_name, "indices");
  } else {
    TORCH_CHECK(lhs.size(1) == M.size(1), "spade_kernels::", op, ": ", lhs_name, " has ", lhs.size(1),
                " columns but M has ", M.size(1));
  }
  return {lhs.to(M.scalar_type()).contiguous(), idx.contiguous(), M.contiguous()};
}

// -- sparsemax_rows -----------------------------------------------------------

template <bool kCuda>
std::tuple<at::Tensor, at::Tensor> sparsemax_rows(const at::Tensor& scores) {
  constexpr const char* op = "sparsemax_rows";
  TORCH_CHECK(scores.dim() == 2, "spade_kernels::", op, ": scores must be 2-D, got ", scores.dim(), "-D");
  const at::ScalarType dtype = scores.scalar_type();
  if constexpr (kCuda) {
    TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, "spade_kernels::", op,
                ": CUDA scores must be float32, bfloat16 or float16, got ", dtype);
  } else {
    TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "spade_kernels::", op,
                ": scores must be float32 or float64 on the CPU, got ", dtype);
  }
  const Guard<kCuda> guard(scores);
  const at::Tensor s = scores.contiguous();
  at::Tensor out = at::empty_like(s);
  // τ is float32 for every CUDA input dtype (float32 arithmetic there), the scores' dtype on the CPU.
  at::Tensor tau = at::empty({s.size(0)}, kCuda ? s.options().dtype(at::kFloat) : s.options());
  const int64_t rows = s.size(0), cols = s.size(1);
  if constexpr (kCuda) {
#ifdef __CUDACC__
    float* tp = tau.data_ptr<float>();
    if (dtype == at::kFloat) {
      SPADE_CUDA_LAUNCH(spade::sparsemax_rows<float>(s.data_ptr<float>(), out.data_ptr<float>(), tp, rows, cols, cols,
                                              stream()));
    } else if (dtype == at::kBFloat16) {
      SPADE_CUDA_LAUNCH(spade::sparsemax_rows<__nv_bfloat16>(reinterpret_cast<const __nv_bfloat16*>(s.data_ptr()),
                                                      reinterpret_cast<__nv_bfloat16*>(out.data_ptr()), tp, rows,
                                                      cols, cols, stream()));
    } else {
      SPADE_CUDA_LAUNCH(spade::sparsemax_rows<__half>(reinterpret_cast<const __half*>(s.data_ptr()),
                                               reinterpret_cast<__half*>(out.data_ptr()), tp, rows, cols, cols,
                                               stream()));
    }
#endif
  } else {
    dispatch_float(dtype, op, [&](auto zero) {
      using T = decltype(zero);
      const T* sp = s.data_ptr<T>();
      T* op_ = out.data_ptr<T>();
      T* tp = tau.data_ptr<T>();
      at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
        std::vector<double> cand;
        for (int64_t r = begin; r < end; ++r) cpu::sparsemax_row(sp + r * cols, op_ + r * cols, tp + r, cols, cand);
      });
    });
  }
  return {out, tau};
}

// -- select_candidates --------------------------------------------------------

// K-chunked GEMM-form scores s' = λ(2·x·aᵀ − ‖a‖²): the dot products of a
// chunk by at::mm into one reused buffer (the CPU BLAS, cuBLAS on the GPU),
// the scores formed and reduced by select.h's selection.
// Returns the candidates (B, W ≤ max_candidates: each row's first, then −1; W is the
// widest row's count) and the rows that overflowed `max_candidates` (B, bool).  Live
// memory: O(B·chunk + B·max_candidates).
template <bool kCuda>
std::tuple<at::Tensor, at::Tensor> select_candidates(const at::Tensor& x, const at::Tensor& A, const at::Tensor& aa,
                                                     double lam, const at::Tensor& margin, int64_t chunk,
                                                     int64_t max_candidates) {
  constexpr const char* op = "select_candidates";
  check_matrix(x, op, "x");
  check_matrix(A, op, "A");
  check_floating(x, op, "x");
  check_like(A, x, op, "A", "x");
  check_like(aa, x, op, "aa", "x");
  check_like(margin, x, op, "margin", "x");
  TORCH_CHECK(A.size(1) == x.size(1), "spade_kernels::", op, ": A has ", A.size(1), " columns but x has ", x.size(1));
  TORCH_CHECK(aa.dim() == 1 && aa.size(0) == A.size(0), "spade_kernels::", op, ": aa must have shape (", A.size(0),
              ",), got ", aa.sizes());
  TORCH_CHECK(margin.dim() == 1 && margin.size(0) == x.size(0), "spade_kernels::", op, ": margin must have shape (",
              x.size(0), ",), got ", margin.sizes());
  TORCH_CHECK(chunk >= 1, "spade_kernels::", op, ": chunk must be >= 1, got ", chunk);
  TORCH_CHECK(max_candidates >= 1 && max_candidates <= std::numeric_limits<int32_t>::max() - kThreads, "spade_kernels::", op,
              ": max_candidates must be >= 1, got ", max_candidates);
  TORCH_CHECK(A.size(0) <= std::numeric_limits<int32_t>::max(), "spade_kernels::", op, ": at most 2^31 - 1 prototypes");
  check_lambda(lam, op);
  const Guard<kCuda> guard(x);
#ifdef __CUDACC__
  if constexpr (kCuda) {
    check_shared_memory(x.scalar_type() == at::kDouble ? select_chunk_shared_bytes<double>(max_candidates)
                                                       : select_chunk_shared_bytes<float>(max_candidates),
                        op, "max_candidates", max_candidates);
  }
#endif
  const int64_t B = x.size(0), K = A.size(0);
  const auto opts = x.options();
  at::Tensor buf_idx = at::empty({B, max_candidates}, opts.dtype(at::kInt));
  at::Tensor buf_val = at::empty({B, max_candidates}, opts);
  at::Tensor count = at::zeros({B}, opts.dtype(at::kInt));
  at::Tensor bound = at::full({B}, -std::numeric_limits<double>::infinity(), opts);
  const at::Tensor xc = x.contiguous(), mc = margin.contiguous(), aac = aa.contiguous();
  // One buffer for every chunk's dot products (its first B·cols elements, contiguous).
  const at::Tensor buffer = at::empty({B * std::min(chunk, K)}, opts);
  for (int64_t c0 = 0; c0 < K && B > 0; c0 += chunk) {
    const int64_t c1 = std::min(K, c0 + chunk), cols = c1 - c0;
    at::Tensor S = buffer.narrow(0, 0, B * cols).view({B, cols});
    at::mm_out(S, xc, A.slice(0, c0, c1).t());
    dispatch_float(S.scalar_type(), op, [&](auto zero) {
      using T = decltype(zero);
      const T* sp = S.data_ptr<T>();
      const T* ap = aac.data_ptr<T>() + c0;
      const T l = static_cast<T>(lam);
      const T* mp = mc.data_ptr<T>();
      int32_t* ip = buf_idx.data_ptr<int32_t>();
      T* vp = buf_val.data_ptr<T>();
      int32_t* cp = count.data_ptr<int32_t>();
      T* bp = bound.data_ptr<T>();
      if constexpr (kCuda) {
        SPADE_CUDA_LAUNCH(
            spade::select_chunk<T>(sp, ap, l, B, cols, cols, c0, mp, ip, vp, cp, bp, static_cast<int>(max_candidates), stream()));
      } else {
        at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
          std::vector<T> sval(max_candidates + kThreads);
          std::vector<int32_t> sidx(max_candidates + kThreads);
          for (int64_t r = begin; r < end; ++r)
            cpu::select_chunk_row(sp + r * cols, ap, l, cols, c0, mp[r], ip + r * max_candidates, vp + r * max_candidates, cp[r], bp[r],
                                  max_candidates, sval.data(), sidx.data());
        });
      }
    });
  }
  // Candidates trimmed to the widest row's count (one host read of count.max()).
  const int64_t width = B > 0 ? std::max<int64_t>(count.max().item<int32_t>(), 1) : 1;
  const at::Tensor slots = at::arange(width, opts.dtype(at::kLong));
  at::Tensor cand = buf_idx.narrow(1, 0, std::min(width, max_candidates)).to(at::kLong);
  cand.masked_fill_(slots.unsqueeze(0) >= count.unsqueeze(1), -1);
  return {cand, count.lt(0)};
}

// out[b·C + j] = ⟨X_b, M_c⟩ or ‖X_b − M_c‖², c = idx[b, j], on the CPU (gather_dot,
// gather_sq_dist, the exact stage's D); `empty` where c is outside [0, K).  Latent
// by latent in row chunks where that pays (sparse.h, latent_major; threads split
// the latents), else row by row.
template <typename T, bool kSqDist>
void cpu_gather_reduce(const T* xp, const int64_t* ip, int64_t B, int64_t C, const T* mp, int64_t K, int64_t d,
                       T empty, T* outp) {
  if (cpu::latent_major(B * C, K, d * static_cast<int64_t>(sizeof(T)))) {
    std::fill(outp, outp + B * C, empty);
    for (int64_t r0 = 0; r0 < B; r0 += cpu::chunk_rows(C)) {
      const cpu::LatentSlots by(ip, r0, std::min(B, r0 + cpu::chunk_rows(C)), C, K);
      at::parallel_for(0, K, kLatentGrain, [&](int64_t c0, int64_t c1) {
        cpu::gather_reduce_latents<T, kSqDist>(xp, mp, d, by, c0, c1, outp);
      });
    }
  } else {
    for_rows(B, 1, [&](int64_t r) {
      cpu::gather_reduce_row<T, kSqDist>(xp + r * d, ip + r * C, C, mp, K, d, empty, outp + r * C);
    });
  }
}

// -- exact_codes --------------------------------------------------------------

template <bool kCuda>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> exact_codes(const at::Tensor& x_, const at::Tensor& A_,
                                                                       double lam, const at::Tensor& cand_) {
  constexpr const char* op = "exact_codes";
  check_matrix(x_, op, "x");
  check_matrix(A_, op, "A");
  check_floating(x_, op, "x");
  check_like(A_, x_, op, "A", "x");
  TORCH_CHECK(A_.size(1) == x_.size(1), "spade_kernels::", op, ": A has ", A_.size(1), " columns but x has ", x_.size(1));
  check_indices(cand_, x_, op, "cand");
  check_rows(cand_, x_.size(0), op, "cand");
  check_lambda(lam, op);
  const Guard<kCuda> guard(x_);
  const at::Tensor x = x_.contiguous(), A = A_.contiguous(), cand = cand_.contiguous();
  const int64_t B = x.size(0), d = x.size(1), W = cand.size(1), K = A.size(0);
#ifdef __CUDACC__
  if constexpr (kCuda) {
    check_shared_memory(x.scalar_type() == at::kDouble ? exact_codes_shared_bytes<double>(W)
                                                       : exact_codes_shared_bytes<float>(W),
                        op, "the candidate width", W);
  }
#endif
  at::Tensor values = at::empty({B, W}, x.options());
  at::Tensor indices = at::empty({B, W}, cand.options());
  at::Tensor size = at::empty({B}, cand.options());
  at::Tensor dist = at::empty({B, W}, x.options());
  dispatch_float(x.scalar_type(), op, [&](auto zero) {
    using T = decltype(zero);
    const T* xp = x.data_ptr<T>();
    const T* ap = A.data_ptr<T>();
    const int64_t* cp = cand.data_ptr<int64_t>();
    T* vp = values.data_ptr<T>();
    int64_t* ip = indices.data_ptr<int64_t>();
    int64_t* sp = size.data_ptr<int64_t>();
    T* dp = dist.data_ptr<T>();
    if constexpr (kCuda) {
      SPADE_CUDA_LAUNCH(spade::exact_codes<T>(xp, ap, B, K, d, cp, W, static_cast<T>(lam), vp, ip, sp, dp, stream()));
    } else {
      // D of every slot (an empty slot's: ∞), then each row's codes.
      std::vector<T> D(static_cast<size_t>(B * W));
      cpu_gather_reduce<T, true>(xp, cp, B, W, ap, K, d, std::numeric_limits<T>::infinity(), D.data());
      at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
        std::vector<T> s;
        std::vector<std::pair<T, int64_t>> support;
        for (int64_t r = begin; r < end; ++r)
          cpu::exact_codes_row(cp + r * W, D.data() + r * W, K, W, static_cast<T>(lam), vp + r * W, ip + r * W,
                               sp[r], dp + r * W, s, support);
      });
    }
  });
  return {values, indices, size, dist};
}

// -- products over a support ----------------------------------------------------

template <bool kCuda>
std::tuple<at::Tensor, at::Tensor> support_jacobian(const at::Tensor& z_, const std::optional<at::Tensor>& grad_z_,
                                                    const at::Tensor& D_, const std::optional<at::Tensor>& grad_D_,
                                                    const at::Tensor& lam_) {
  constexpr const char* op = "support_jacobian";
  check_matrix(z_, op, "z");
  check_floating(z_, op, "z");
  check_like(D_, z_, op, "D", "z");
  check_same_shape(D_, z_, op, "D", "z");
  TORCH_CHECK(lam_.numel() == 1, "spade_kernels::", op, ": lam must hold one value, got shape ", lam_.sizes());
  TORCH_CHECK(lam_.device() == z_.device(), "spade_kernels::", op, ": lam is on ", lam_.device(), " but z is on ",
              z_.device());
  auto prep = [&](const std::optional<at::Tensor>& g, const char* name) -> std::optional<at::Tensor> {
    if (!g.has_value()) return std::nullopt;
    TORCH_CHECK(g->device() == z_.device(), "spade_kernels::", op, ": ", name, " is on ", g->device(), " but z is on ",
                z_.device());
    check_same_shape(*g, z_, op, name, "z");
    return g->to(z_.scalar_type()).contiguous();
  };
  const Guard<kCuda> guard(z_);
  const std::optional<at::Tensor> grad_z = prep(grad_z_, "grad_z"), grad_D = prep(grad_D_, "grad_D");
  const at::Tensor z = z_.contiguous(), D = D_.contiguous();
  const at::Tensor lam = lam_.to(z.scalar_type()).reshape({1}).contiguous();
  const int64_t B = z.size(0), C = z.size(1);
  at::Tensor G = at::empty_like(z);
  at::Tensor lam_rows = at::empty({B}, z.options());
  dispatch_float(z.scalar_type(), op, [&](auto zero) {
    using T = decltype(zero);
    const T* gz = grad_z ? grad_z->data_ptr<T>() : nullptr;
    const T* gD = grad_D ? grad_D->data_ptr<T>() : nullptr;
    const T* zp = z.data_ptr<T>();
    const T* Dp = D.data_ptr<T>();
    T* Gp = G.data_ptr<T>();
    T* lp = lam_rows.data_ptr<T>();
    if constexpr (kCuda) {
      SPADE_CUDA_LAUNCH(spade::support_jacobian<T>(zp, gz, Dp, gD, lam.data_ptr<T>(), B, C, Gp, lp, stream()));
    } else {
      const T l = lam.data_ptr<T>()[0];
      for_rows(B, 16, [&](int64_t r) {
        cpu::support_jacobian_row(zp + r * C, gz ? gz + r * C : nullptr, Dp + r * C, gD ? gD + r * C : nullptr, l, C,
                                  Gp + r * C, lp[r]);
      });
    }
  });
  return {G, lam_rows};
}

template <bool kCuda>
at::Tensor gather_matmul(const at::Tensor& weights, const at::Tensor& indices, const at::Tensor& M_) {
  at::Tensor w, idx, M;
  std::tie(w, idx, M) = check_gather(weights, indices, M_, "gather_matmul", "weights", true);
  const Guard<kCuda> guard(M);
  const int64_t B = idx.size(0), C = idx.size(1), K = M.size(0), d = M.size(1);
  at::Tensor out = at::empty({B, d}, M.options());
  dispatch_float(M.scalar_type(), "gather_matmul", [&](auto zero) {
    using T = decltype(zero);
    const T* wp = w.data_ptr<T>();
    const int64_t* ip = idx.data_ptr<int64_t>();
    const T* mp = M.data_ptr<T>();
    T* op = out.data_ptr<T>();
    if constexpr (kCuda) {
      SPADE_CUDA_LAUNCH(spade::gather_matmul<T>(wp, ip, B, C, mp, K, d, op, stream()));
    } else {
      if (cpu::latent_major(B * C, K, d * static_cast<int64_t>(sizeof(T)))) {  // each row of M read once per thread
        cpu::FiniteRows<T> finite(mp, K, d);
        for (int64_t c0 = 0; c0 < B; c0 += cpu::chunk_rows(C)) {
          const int64_t c1 = std::min(B, c0 + cpu::chunk_rows(C));
          const cpu::LatentSlots by(ip, c0, c1, C, K, cpu::ZeroWeightOnFiniteRow<T>{wp, finite, true, ip, C});
          at::parallel_for(c0, c1, 64, [&](int64_t r0, int64_t r1) {
            cpu::gather_matmul_latents(wp, ip, C, mp, K, d, by, r0, r1, op);
          });
        }
      } else {
        for_rows(B, 1, [&](int64_t r) { cpu::gather_matmul_row(wp + r * C, ip + r * C, C, mp, K, d, op + r * d); });
      }
    }
  });
  return out;
}

template <bool kCuda, bool kSqDist>
at::Tensor gather_reduce(const at::Tensor& X_, const at::Tensor& indices, const at::Tensor& M_, const char* op) {
  at::Tensor X, idx, M;
  std::tie(X, idx, M) = check_gather(X_, indices, M_, op, kSqDist ? "x" : "G", false);
  const Guard<kCuda> guard(M);
  const int64_t B = idx.size(0), C = idx.size(1), K = M.size(0), d = M.size(1);
  at::Tensor out = at::empty({B, C}, M.options());
  dispatch_float(M.scalar_type(), op, [&](auto zero) {
    using T = decltype(zero);
    const T* xp = X.data_ptr<T>();
    const int64_t* ip = idx.data_ptr<int64_t>();
    const T* mp = M.data_ptr<T>();
    T* outp = out.data_ptr<T>();
    if constexpr (kCuda) {
      SPADE_CUDA_LAUNCH((spade::gather_reduce<T, kSqDist>(xp, ip, B, C, mp, K, d, outp, stream())));
    } else {
      cpu_gather_reduce<T, kSqDist>(xp, ip, B, C, mp, K, d, std::numeric_limits<T>::quiet_NaN(), outp);
    }
  });
  return out;
}

template <bool kCuda>
at::Tensor gather_dot(const at::Tensor& G, const at::Tensor& indices, const at::Tensor& M) {
  return gather_reduce<kCuda, false>(G, indices, M, "gather_dot");
}

template <bool kCuda>
at::Tensor gather_sq_dist(const at::Tensor& x, const at::Tensor& indices, const at::Tensor& M) {
  return gather_reduce<kCuda, true>(x, indices, M, "gather_sq_dist");
}

// The sparse transpose, deterministic: the entries of idx (B, C) sorted by
// latent, then each latent's segment [seg[k], seg[k + 1]) summed in order.
// Indices outside [0, n_rows) fall in no segment.  No host synchronisation.
// With M (n_rows, d): Σ w·(X[b] − M[k]) per latent (∂prototypes in one pass).
template <bool kCuda>
at::Tensor scatter_matmul(const at::Tensor& weights, const at::Tensor& indices, const at::Tensor& X_,
                          int64_t n_rows, const std::optional<at::Tensor>& M_) {
  constexpr const char* op = "scatter_matmul";
  check_matrix(weights, op, "weights");
  check_matrix(X_, op, "X");
  check_floating(X_, op, "X");
  check_indices(indices, X_, op, "indices");
  TORCH_CHECK(weights.device() == X_.device(), "spade_kernels::", op, ": weights is on ", weights.device(),
              " but X is on ", X_.device());
  check_same_shape(weights, indices, op, "weights", "indices");
  check_rows(X_, indices.size(0), op, "X");
  TORCH_CHECK(n_rows >= 0, "spade_kernels::", op, ": n_rows must be >= 0, got ", n_rows);
  if (M_.has_value()) {
    check_matrix(*M_, op, "M");
    check_like(*M_, X_, op, "M", "X");
    TORCH_CHECK(M_->size(0) == n_rows && M_->size(1) == X_.size(1), "spade_kernels::", op, ": M has shape ",
                M_->sizes(), ", expected (n_rows, d) = (", n_rows, ", ", X_.size(1), ")");
  }
  const Guard<kCuda> guard(X_);
  const at::Tensor w = weights.to(X_.scalar_type()).contiguous(), idx = indices.contiguous(), X = X_.contiguous();
  const at::Tensor M = M_.has_value() ? M_->contiguous() : at::Tensor();
  const int64_t C = idx.size(1), d = X.size(1);
  at::Tensor out = large_empty({n_rows, d}, X.options());
  dispatch_float(X.scalar_type(), op, [&](auto zero) {
    using T = decltype(zero);
    const T* wp = w.data_ptr<T>();
    const T* xp = X.data_ptr<T>();
    const T* mp = M.defined() ? M.data_ptr<T>() : nullptr;
    T* outp = out.data_ptr<T>();
    if constexpr (kCuda) {
      at::Tensor sorted, order;
      std::tie(sorted, order) = at::sort(idx.reshape({-1}), /*stable=*/true, /*dim=*/0, /*descending=*/false);
      order = order.contiguous();
      const at::Tensor seg = at::searchsorted(sorted, at::arange(n_rows + 1, idx.options())).contiguous();
      SPADE_CUDA_LAUNCH(spade::scatter_matmul<T>(wp, order.data_ptr<int64_t>(), seg.data_ptr<int64_t>(), C, xp, mp, d,
                                                 n_rows, outp, stream()));
    } else {  // the same order by a counting sort (no host sync to avoid on the CPU)
      const int64_t* ip = idx.data_ptr<int64_t>();
      cpu::FiniteRows<T> finite(xp, X.size(0), d);
      const int64_t B = idx.size(0);
      // With M: each latent's weight sum over the whole batch, in slot order (the row chunks below
      // take the batch in parts; the first one starts each row from −sum·M[k]).
      std::vector<T> wsum(mp != nullptr ? n_rows : 0, T(0));
      if (mp != nullptr)
        for (int64_t f = 0; f < B * C; ++f)
          if (ip[f] >= 0 && ip[f] < n_rows) wsum[ip[f]] += wp[f];
      for (int64_t r0 = 0; r0 == 0 || r0 < B; r0 += cpu::chunk_rows(C)) {  // the first chunk writes the zeros
        const cpu::LatentSlots by(ip, r0, std::min(B, r0 + cpu::chunk_rows(C)), C, n_rows,
                                  cpu::ZeroWeightOnFiniteRow<T>{wp, finite, false, ip, C});
        for_rows(n_rows, 64, [&](int64_t k) {
          cpu::scatter_matmul_row(wp, by, k, xp, d, r0 == 0, mp != nullptr ? mp + k * d : nullptr,
                                  mp != nullptr ? wsum[k] : T(0), outp + k * d);
        });
      }
    }
  });
  return out;
}

}  // namespace spade::binding
