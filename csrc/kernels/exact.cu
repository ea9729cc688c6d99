// Explicit instantiations of the exact-codes (merge + exact τ) kernel (torch-free).
#include "spade/exact.cuh"

namespace spade {
#define SPADE_INSTANTIATE(T)                                                                            \
  template cudaError_t exact_codes<T>(const T*, const T*, int64_t, int64_t, int64_t, const int64_t*, int64_t, T, T*, \
                                      int64_t*, int64_t*, T*, cudaStream_t);
SPADE_INSTANTIATE(float)
SPADE_INSTANTIATE(double)
#undef SPADE_INSTANTIATE
}  // namespace spade
