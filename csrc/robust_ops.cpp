// Every C++ schema of robust_ops, defined once. Kernels live in one file per dispatch key:
// csrc/cpu/<op>_kernel.cpp (CPU) and csrc/cuda/<op>_kernel.cu (CUDA). Fake kernels and autograd are
// registered in Python (robust_ops/_meta.py, robust_ops/_autograd.py). Semantics: docs/ops/.
#include <Python.h>
#include <torch/library.h>

#include "cpu_memory_pool.h"
#include "drop_max_pool2d.h"

#ifdef WITH_CUDA
#include <cuda.h>
#endif

// The digest of the csrc/ this build was made from: setup.py writes source_digest.h into its build folder
// (robust_ops/_source_digest.py); builds without it (CMakeLists.txt's) carry none. `import robust_ops` compares it
// with csrc/ in a source checkout and warns when they differ: a build not redone after a pull.
#if __has_include("source_digest.h")
#include "source_digest.h"
#endif

// A stub module init so `import robust_ops._C` loads the library (and runs the registrations below)
// without pybind11 (extension-cpp pattern).
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
#ifdef ROBUST_OPS_SOURCE_DIGEST
  if (module != nullptr && PyModule_AddStringConstant(module, "SOURCE_DIGEST", ROBUST_OPS_SOURCE_DIGEST) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
#endif
  return module;
}
}

namespace robust_ops {

int64_t cuda_version() {
#ifdef WITH_CUDA
  return CUDA_VERSION;
#else
  return -1;
#endif
}

TORCH_LIBRARY(robust_ops, m) {
  // Drop-max pooling (MIRST-DM): per window the largest value left after removing ONE occurrence of the maximum.
  // input is 4-D (N, C, H, W), any memory format; returns (output, indices) with indices flat into H*W.
  m.def(
      "drop_max_pool2d(Tensor input, int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation, "
      "bool ceil_mode) -> (Tensor, Tensor)");
  // SymInt[]: under torch.compile the input size stays symbolic (int[] would guard on, and recompile for, every
  // batch size); the kernels read it as plain integers.
  m.def("_drop_max_pool2d_backward(Tensor grad_output, Tensor indices, SymInt[] input_size) -> Tensor");
  // Max pooling with ATen's exact selection rule on the drop-max kernel's vectorized windows: bitwise equal to
  // F.max_pool2d(return_indices=True), several times faster than ATen's NCHW CPU kernel. CPU kernel only (on CUDA
  // torch's own pooling is already at memory bandwidth); its backward is _drop_max_pool2d_backward.
  m.def(
      "max_pool2d(Tensor input, int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation, "
      "bool ceil_mode) -> (Tensor, Tensor)");

  // Input gradient of eval-mode batch norm, (grad_output * invstd[c]) * weight[c]: bitwise ATen's, without the
  // per-channel reductions ATen's backward always runs. CPU kernel only (robust_ops.native_layers).
  m.def("_eval_batch_norm_backward(Tensor grad_output, Tensor invstd, Tensor? weight) -> Tensor");

  // One fused PGD update, in place: x_adv <- clip(P_eps(x_adv + alpha * direction(grad))), per-sample alpha/eps [N];
  // norm is "linf" or "l2". When history is given, the new iterate is also written into history[slot].
  m.def(
      "pgd_step_(Tensor(a!) x_adv, Tensor x_nat, Tensor grad, Tensor alpha, Tensor eps, float clip_min, "
      "float clip_max, str norm, Tensor(b!)? history, int slot) -> ()");

  // One round of a batched k-ary boundary search, in place. points holds the k-1 interior points [k-1, N, ...]
  // between lo and hi; crossed_at[n] in [0, k-1] is the first interior point (lo->hi order) on the far side of the
  // boundary, k-1 meaning none. For active samples lo/hi move to the bracketing points and points is rewritten
  // as the k-1 interior points of the new interval. k = 2 is bisection.
  m.def(
      "boundary_search_step_(Tensor(a!) lo, Tensor(b!) hi, Tensor(c!) points, Tensor crossed_at, "
      "Tensor? active) -> ()");

  m.def("_cuda_version() -> int", &cuda_version);
  // Which vector path the CPU pooling kernels take on this machine (csrc/drop_max_pool2d.h); not a tensor op.
  m.def("_cpu_vector_isa() -> str", &cpu_vector_isa);

  // The scoped caching CPU allocator the attacks run under (csrc/cpu_memory_pool.h); not tensor ops.
  m.def("_cpu_pool_enter() -> bool", &cpu_pool_enter);
  m.def("_cpu_pool_exit() -> ()", &cpu_pool_exit);
  m.def("_cpu_pool_stats() -> int[]", &cpu_pool_stats);
}

// The tensor ops called directly (torch.ops.robust_ops.*) with a tensor that is not strided (sparse, mkldnn) got the
// dispatcher's ~50-line "Could not run 'robust_ops::drop_max_pool2d' with arguments from the 'SparseCPU' backend":
// these keys get one kernel that names the op and the argument, in the words of functional._check_strided and the
// Triton ops' check_strided. The strided keys' dispatch is untouched.
void refuse_not_strided(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const std::string name = op.schema().name().substr(op.schema().name().find("::") + 2);
  const auto& arguments = op.schema().arguments();
  const auto values = torch::jit::last(*stack, arguments.size());
  for (size_t i = 0; i < arguments.size(); ++i) {
    if (values[i].isTensor() && values[i].toTensor().layout() != at::kStrided) {
      TORCH_CHECK(false, name, ": expected ", arguments[i].name(), " to be a strided (dense) tensor, got ",
                  py_layout(values[i].toTensor().layout()), "; there is no ", name,
                  " kernel for it: convert with .to_dense()");
    }
  }
  TORCH_CHECK(false, name, ": expected strided (dense) tensors; there is no ", name, " kernel for ",
              c10::toString(op.schema()));
}

void register_not_strided_refusals(torch::Library& m) {
  for (const char* op : {"drop_max_pool2d", "_drop_max_pool2d_backward", "max_pool2d", "_eval_batch_norm_backward",
                         "pgd_step_", "boundary_search_step_"}) {
    m.impl(op, torch::CppFunction::makeFromBoxedFunction<&refuse_not_strided>());
  }
}

TORCH_LIBRARY_IMPL(robust_ops, SparseCPU, m) { register_not_strided_refusals(m); }
TORCH_LIBRARY_IMPL(robust_ops, SparseCUDA, m) { register_not_strided_refusals(m); }
TORCH_LIBRARY_IMPL(robust_ops, SparseCsrCPU, m) { register_not_strided_refusals(m); }
TORCH_LIBRARY_IMPL(robust_ops, SparseCsrCUDA, m) { register_not_strided_refusals(m); }
TORCH_LIBRARY_IMPL(robust_ops, MkldnnCPU, m) { register_not_strided_refusals(m); }

}  // namespace robust_ops
