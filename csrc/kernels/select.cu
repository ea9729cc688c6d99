// Explicit instantiations of the chunk selection epilogue (torch-free).
#include "spade/select.cuh"

namespace spade {
#define SPADE_INSTANTIATE(T)                                                                           \
  template cudaError_t select_chunk<T>(const T*, int64_t, int64_t, int64_t, int64_t, const T*, int32_t*, T*, \
                                       int32_t*, T*, int, cudaStream_t);
SPADE_INSTANTIATE(float)
SPADE_INSTANTIATE(double)
#undef SPADE_INSTANTIATE
}  // namespace spade
