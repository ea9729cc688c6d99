// The CPU implementations of the spade ops (C++ with OpenMP through
// at::parallel_for): the <false> instantiations of csrc/ops.h.  The schemas
// are declared in spade_kernels/ops.py.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY_IMPL(spade_kernels, CPU, m) {
#define SPADE_REGISTER(name) m.impl(#name, &spade::binding::name<false>);
  SPADE_OPS(SPADE_REGISTER)
#undef SPADE_REGISTER
}

// The output cache of the CPU library (ops.h, OutputCache): not ops on
// tensors, so catch-all kernels, declared here.
TORCH_LIBRARY_FRAGMENT(spade_kernels, m) {
  m.def("release_cached_outputs() -> int", []() { return spade::binding::OutputCache::get().release(); });
  m.def("cached_output_bytes() -> int", []() { return spade::binding::OutputCache::get().held(); });
}

namespace {

// The ops have no derivative of their own: the package's autograd formulas
// call them (spade_kernels/pipeline; docs/design.md, "Autograd").  Called on
// a tensor that requires grad while autograd records, an op raises here,
// instead of torch's default for an op without an autograd kernel (a warning,
// then gradients that treat the op's output as a constant).  Otherwise it
// passes through to the device kernel (CPU or CUDA) at the cost of one
// boxed call.
void no_derivative(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  if (at::GradMode::is_enabled()) {
    const auto& args = op.schema().arguments();
    const size_t first = stack->size() - args.size();
    for (size_t i = 0; i < args.size(); ++i) {
      const c10::IValue& v = (*stack)[first + i];
      TORCH_CHECK(!(v.isTensor() && v.toTensor().defined() && v.toTensor().requires_grad()), op.schema().name(),
                  ": argument '", args[i].name(),
                  "' requires grad, but this op has no derivative; differentiate through "
                  "spade_kernels.spade_encode, spade_kernels.sparsemax or the SpaDE layer (their backward "
                  "passes call it), or pass a tensor detached from the graph");
    }
  }
  op.redispatchBoxed(keys & c10::after_autograd_keyset, stack);
}

}  // namespace

TORCH_LIBRARY_IMPL(spade_kernels, Autograd, m) {
#define SPADE_NO_DERIVATIVE(name) m.impl(#name, torch::CppFunction::makeFromBoxedFunction<&no_derivative>());
  SPADE_OPS(SPADE_NO_DERIVATIVE)
#undef SPADE_NO_DERIVATIVE
}
