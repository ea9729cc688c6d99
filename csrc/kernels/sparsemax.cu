// Explicit instantiations of the dense-row sparsemax kernel (torch-free).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "spade/sparsemax.cuh"

namespace spade {
namespace detail {
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}
template <>
__device__ __forceinline__ float to_float<__half>(__half v) {
  return __half2float(v);
}
// Explicit conversions: torch's extension build defines __CUDA_NO_HALF_CONVERSIONS__
// and __CUDA_NO_BFLOAT16_CONVERSIONS__, which remove the implicit ones.
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16(v);
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half(v);
}
}  // namespace detail

template cudaError_t sparsemax_rows<float>(const float*, float*, float*, int64_t, int64_t, int64_t,
                                           cudaStream_t);
template cudaError_t sparsemax_rows<__nv_bfloat16>(const __nv_bfloat16*, __nv_bfloat16*, float*, int64_t,
                                                   int64_t, int64_t, cudaStream_t);
template cudaError_t sparsemax_rows<__half>(const __half*, __half*, float*, int64_t, int64_t, int64_t,
                                            cudaStream_t);
}  // namespace spade
