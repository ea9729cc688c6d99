// The CPU implementations of the spade ops (C++ with OpenMP through
// at::parallel_for): the <false> instantiations of csrc/ops.h.  The schemas
// are declared in spade_kernels/ops.py.
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY_IMPL(spade, CPU, m) {
#define SPADE_REGISTER(name) m.impl(#name, &spade::binding::name<false>);
  SPADE_OPS(SPADE_REGISTER)
#undef SPADE_REGISTER
}
