// Stand-in for the header that CUDA builds of torch generate at build time
// and CPU wheels do not ship; used only by scripts/check_cuda_binding.sh to
// compile-check csrc/cuda/*.cpp against the CPU wheel's headers.
#pragma once
#define C10_CUDA_BUILD_SHARED_LIBS
