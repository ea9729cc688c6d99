// The CUDA implementations of the spade ops: the <true> instantiations of
// csrc/ops.h, compiled by nvcc (the kernels of csrc/include/spade are
// instantiated here, for the dtypes the drivers dispatch to).  The schemas
// are declared in spade_kernels/ops.py.
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY_IMPL(spade_kernels, CUDA, m) {
#define SPADE_REGISTER(name) m.impl(#name, &spade::binding::name<true>);
  SPADE_OPS(SPADE_REGISTER)
#undef SPADE_REGISTER
}
