// Argument checking for apply_channel_masks_, shared by the CPU and CUDA kernels. Everything is
// validated before any tensor is written, so a rejected call leaves every tensor untouched.
#pragma once

#include <ATen/core/Tensor.h>

#include <c10/core/ScalarType.h>
#include <c10/util/StringUtil.h>

#include <algorithm>
#include <string>

#include <vector>

namespace dfmu {

inline bool is_floating(at::ScalarType st) {
  return st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16;
}

// Mask values are applied in the tensor's "op math" precision: float64 for float64 tensors,
// float32 for everything else (half/bfloat16 products are rounded once, from float32).
inline at::ScalarType mask_math_dtype(at::ScalarType tensor_dtype) {
  return tensor_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

// A tensor whose memory is one block of `inner` contiguous elements per unit, units in order:
// then unit(i) = flat_index / inner. True for contiguous and channels_last weights.
inline bool units_are_outer_blocks(const at::Tensor& t) {
  if (t.dim() <= 1) return t.dim() == 0 || t.stride(0) == 1 || t.size(0) <= 1;
  const int64_t inner = t.numel() / std::max<int64_t>(t.size(0), 1);
  return t.is_non_overlapping_and_dense() && (t.size(0) <= 1 || t.stride(0) == inner);
}

// The first problem with the arguments: a code (which check failed, see ProblemCode), the index
// of the offending tensor, and the message the throwing op uses. Non-throwing, so that the Python
// wrapper can validate in C++ speed (a Python loop over a ResNet-50's 161 parameters cost ~150 us
// per call) and raise the Python exception itself.
enum class ProblemCode : int64_t {
  kNone = 0,
  kTensorDtype = 1,    // TypeError
  kMaskDtype = 2,      // TypeError
  kTensor0D = 3,
  kMaskNot1D = 4,
  kMaskLength = 5,
  kMaskDevice = 6,
  kTensorDevice = 7,   // differs from tensors[0]'s
  kWrongBackend = 8,   // e.g. CPU tensors reaching the CUDA kernel
  kListLengths = 9,
};

struct ArgProblem {
  ProblemCode code = ProblemCode::kNone;
  int64_t index = 0;
  std::string message;
  explicit operator bool() const { return code != ProblemCode::kNone; }
  bool is_type_error() const { return code == ProblemCode::kTensorDtype || code == ProblemCode::kMaskDtype; }
  // code * 2^32 + index: what try_apply_channel_masks_ returns (an int crosses any C++ ABI boundary).
  int64_t encoded() const { return (int64_t(code) << 32) + index; }
};

inline ArgProblem channel_masks_problem(at::TensorList tensors, at::TensorList masks) {
  auto problem = [](ProblemCode code, int64_t i, auto&&... parts) {
    return ArgProblem{code, i, c10::str("apply_channel_masks_: ", parts...)};
  };
  if (tensors.size() != masks.size()) {
    return problem(ProblemCode::kListLengths, 0, "got ", tensors.size(), " tensors but ", masks.size(), " masks");
  }
  for (size_t k = 0; k < tensors.size(); ++k) {
    const auto i = int64_t(k);
    const at::Tensor& t = tensors[k];
    const at::Tensor& m = masks[k];
    if (!is_floating(t.scalar_type())) {
      return problem(ProblemCode::kTensorDtype, i, "tensors[", i, "] must be float16, bfloat16, float32 or "
                     "float64, got ", t.scalar_type());
    }
    if (!at::isFloatingType(m.scalar_type())) {
      return problem(ProblemCode::kMaskDtype, i, "masks[", i, "] must be a floating-point tensor, got ",
                     m.scalar_type());
    }
    if (t.dim() < 1) {
      return problem(ProblemCode::kTensor0D, i, "tensors[", i, "] must have a unit dimension 0, got a 0-D tensor");
    }
    if (m.dim() != 1) {
      return problem(ProblemCode::kMaskNot1D, i, "masks[", i, "] must be 1-D, got shape ", m.sizes());
    }
    if (m.size(0) != t.size(0)) {
      return problem(ProblemCode::kMaskLength, i, "masks[", i, "] has ", m.size(0), " values but tensors[", i,
                     "] has ", t.size(0), " units in dim 0");
    }
    if (t.device() != m.device()) {
      return problem(ProblemCode::kMaskDevice, i, "tensors[", i, "] is on ", t.device(), " but masks[", i,
                     "] is on ", m.device());
    }
    if (t.device() != tensors[0].device()) {
      return problem(ProblemCode::kTensorDevice, i, "tensors[", i, "] is on ", t.device(), " but tensors[0] is on ",
                     tensors[0].device());
    }
  }
  return {};
}

inline void throw_if(const ArgProblem& problem) {
  TORCH_CHECK_TYPE(!(problem && problem.is_type_error()), problem.message);
  TORCH_CHECK_VALUE(!problem, problem.message);
}

}  // namespace dfmu
