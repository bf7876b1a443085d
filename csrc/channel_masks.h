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

// The first problem with the arguments: which check failed and the index of the offending tensor.
// Validation runs in C++ for the whole list in one pass (a Python loop over a ResNet-50's 161
// parameters cost ~150 us per call); problem_message below is the one table of the messages.
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
  explicit operator bool() const { return code != ProblemCode::kNone; }
  bool is_type_error() const { return code == ProblemCode::kTensorDtype || code == ProblemCode::kMaskDtype; }
};

// `backend`: the device type of the kernel asking (for kWrongBackend).
inline ArgProblem channel_masks_problem(at::TensorList tensors, at::TensorList masks, c10::DeviceType backend) {
  if (tensors.size() != masks.size()) return {ProblemCode::kListLengths, 0};
  for (size_t k = 0; k < tensors.size(); ++k) {
    const auto i = int64_t(k);
    const at::Tensor& t = tensors[k];
    const at::Tensor& m = masks[k];
    if (!is_floating(t.scalar_type())) return {ProblemCode::kTensorDtype, i};
    if (!at::isFloatingType(m.scalar_type())) return {ProblemCode::kMaskDtype, i};
    if (t.dim() < 1) return {ProblemCode::kTensor0D, i};
    if (m.dim() != 1) return {ProblemCode::kMaskNot1D, i};
    if (m.size(0) != t.size(0)) return {ProblemCode::kMaskLength, i};
    if (t.device() != m.device()) return {ProblemCode::kMaskDevice, i};
    if (t.device() != tensors[0].device()) return {ProblemCode::kTensorDevice, i};
  }
  if (!tensors.empty() && tensors[0].device().type() != backend) return {ProblemCode::kWrongBackend, 0};
  return {};
}

// The message for `problem`: the one table of apply_channel_masks_'s argument errors.
inline std::string problem_message(const ArgProblem& problem, at::TensorList tensors, at::TensorList masks) {
  const int64_t i = problem.index;
  const char* p = "apply_channel_masks_: ";
  switch (problem.code) {
    case ProblemCode::kNone: return "";
    case ProblemCode::kListLengths: return c10::str(p, "got ", tensors.size(), " tensors but ", masks.size(), " masks");
    case ProblemCode::kTensorDtype:
      return c10::str(p, "tensors[", i, "] must be float16, bfloat16, float32 or float64, got ",
                      tensors[i].scalar_type());
    case ProblemCode::kMaskDtype:
      return c10::str(p, "masks[", i, "] must be a floating-point tensor, got ", masks[i].scalar_type());
    case ProblemCode::kTensor0D: return c10::str(p, "tensors[", i, "] must have a unit dimension 0, got a 0-D tensor");
    case ProblemCode::kMaskNot1D: return c10::str(p, "masks[", i, "] must be 1-D, got shape ", masks[i].sizes());
    case ProblemCode::kMaskLength:
      return c10::str(p, "masks[", i, "] has ", masks[i].size(0), " values but tensors[", i, "] has ",
                      tensors[i].size(0), " units in dim 0");
    case ProblemCode::kMaskDevice:
      return c10::str(p, "tensors[", i, "] is on ", tensors[i].device(), " but masks[", i, "] is on ",
                      masks[i].device());
    case ProblemCode::kTensorDevice:
      return c10::str(p, "tensors[", i, "] is on ", tensors[i].device(), " but tensors[0] is on ",
                      tensors[0].device());
    case ProblemCode::kWrongBackend:
      return c10::str(p, "tensors[0] is on ", tensors[0].device(), ", which this build has no kernel for");
  }
  return "";
}

inline void throw_if(const ArgProblem& problem, at::TensorList tensors, at::TensorList masks) {
  if (!problem) return;
  const std::string message = problem_message(problem, tensors, masks);
  TORCH_CHECK_TYPE(!problem.is_type_error(), message);
  TORCH_CHECK_VALUE(false, message);
}

// The entry point each backend registers around its kernel (which gets validated arguments): every
// argument is checked before any tensor is written, so a rejected call modifies nothing.
template <c10::DeviceType kBackend, void (*kKernel)(at::TensorList, at::TensorList)>
void checked_apply_channel_masks(at::TensorList tensors, at::TensorList masks) {
  throw_if(channel_masks_problem(tensors, masks, kBackend), tensors, masks);
  kKernel(tensors, masks);
}

}  // namespace dfmu
