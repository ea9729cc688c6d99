// Explicit instantiations of the support products (torch-free).
#include "spade/sparse.cuh"

namespace spade {
#define SPADE_INSTANTIATE(T)                                                                                  \
  template cudaError_t support_jacobian<T>(const T*, const T*, const T*, const T*, const T*, int64_t, int64_t, \
                                           T*, T*, cudaStream_t);                                             \
  template cudaError_t gather_matmul<T>(const T*, const int64_t*, int64_t, int64_t, const T*, int64_t, int64_t, \
                                        T*, cudaStream_t);                                                    \
  template cudaError_t gather_reduce<T, false>(const T*, const int64_t*, int64_t, int64_t, const T*, int64_t,  \
                                               int64_t, T*, cudaStream_t);                                    \
  template cudaError_t gather_reduce<T, true>(const T*, const int64_t*, int64_t, int64_t, const T*, int64_t,   \
                                              int64_t, T*, cudaStream_t);                                     \
  template cudaError_t scatter_matmul<T>(const T*, const int64_t*, const int64_t*, int64_t, const T*, int64_t, \
                                         int64_t, T*, cudaStream_t);
SPADE_INSTANTIATE(float)
SPADE_INSTANTIATE(double)
#undef SPADE_INSTANTIATE
}  // namespace spade
