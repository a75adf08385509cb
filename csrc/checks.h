// TORCH_CHECK helpers that name the op and the argument, with what was expected and what came.
#pragma once
#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <sstream>
#include <string>

namespace robust_ops {

// Messages spell dtypes and shapes as Python does (torch.float32, (2, 3), (5,)) so the C++ checks raise the same text
// as the fake kernels in robust_ops/_meta.py.
inline std::string py_dtype(at::ScalarType t) { return "torch." + std::string(c10::getDtypeNames(t).first); }

// torch.sparse_coo, torch._mkldnn, ...: str() of the Python layout.
inline std::string py_layout(at::Layout layout) {
  switch (layout) {
    case at::kStrided: return "torch.strided";
    case at::kSparse: return "torch.sparse_coo";
    case at::kSparseCsr: return "torch.sparse_csr";
    case at::kSparseCsc: return "torch.sparse_csc";
    case at::kSparseBsr: return "torch.sparse_bsr";
    case at::kSparseBsc: return "torch.sparse_bsc";
    case at::kMkldnn: return "torch._mkldnn";
    case at::kJagged: return "torch.jagged";
    default: return c10::str(layout);
  }
}

inline std::string py_tuple(c10::IntArrayRef sizes) {
  std::ostringstream s;
  s << "(";
  for (size_t i = 0; i < sizes.size(); ++i) s << (i ? ", " : "") << sizes[i];
  s << (sizes.size() == 1 ? ",)" : ")");
  return s.str();
}

// The schema's Tensor (not Tensor?) arguments take None too, as an undefined tensor, whose shape reads (0,) and whose
// dtype fails dispatch ("Unimplemented scalar type"): checked first, with _meta.check_tensors_given's message.
inline void check_given(const char* op, const char* arg, const at::Tensor& t) {
  TORCH_CHECK(t.defined(), op, ": expected ", arg, " to be a tensor, got None");
}

// "<op>: expected <arg> to be a floating-point tensor (float16, bfloat16, float32, float64), got torch.int64". Exactly
// the four dtypes the kernels dispatch on (_meta.FLOATING): at::isFloatingType also admits the float8 types, which
// would pass here and then fail in dispatch with another message (and disagree with the fake kernels).
inline void check_floating(const char* op, const char* arg, const at::Tensor& t) {
  const at::ScalarType s = t.scalar_type();
  TORCH_CHECK(s == at::kHalf || s == at::kBFloat16 || s == at::kFloat || s == at::kDouble, op, ": expected ", arg,
              " to be a floating-point tensor (float16, bfloat16, float32, float64), got ", py_dtype(s));
}

inline void check_same_dtype(const char* op, const char* arg, const at::Tensor& t, const char* ref_arg,
                             const at::Tensor& ref) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": expected ", arg, " to have the dtype of ", ref_arg, " (",
              py_dtype(ref.scalar_type()), "), got ", py_dtype(t.scalar_type()));
}

inline void check_same_device(const char* op, const char* arg, const at::Tensor& t, const char* ref_arg,
                              const at::Tensor& ref) {
  TORCH_CHECK(t.device() == ref.device(), op, ": expected ", arg, " on the device of ", ref_arg, " (", ref.device(),
              "), got ", t.device());
}

// A tensor written in place must not have internal overlap (an expanded tensor); checked before any write so that a
// rejected call changes nothing. ATen's assert_no_internal_overlap text, naming the op and argument (as _meta.py).
inline void check_no_internal_overlap(const char* op, const char* arg, const at::Tensor& t) {
  TORCH_CHECK(at::has_internal_overlap(t) != at::MemOverlap::Yes, op, ": expected ", arg,
              " without internal overlap (more than one element of the written-to tensor refers to a single memory "
              "location); clone() it first");
}

}  // namespace robust_ops
