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

// The first problem with the arguments, as {kind, message} (kind: "TypeError" or "ValueError"),
// or an empty kind when they are fine. Non-throwing, so that the Python wrapper can validate in
// C++ speed (a ResNet-50 has 161 parameters: a Python loop over them cost ~150 us per call) and
// raise the Python exception itself.
struct ArgProblem {
  std::string kind;
  std::string message;
  explicit operator bool() const { return !kind.empty(); }
};

inline ArgProblem channel_masks_problem(at::TensorList tensors, at::TensorList masks) {
  auto value_error = [](auto&&... parts) { return ArgProblem{"ValueError", c10::str(parts...)}; };
  auto type_error = [](auto&&... parts) { return ArgProblem{"TypeError", c10::str(parts...)}; };
  if (tensors.size() != masks.size()) {
    return value_error("apply_channel_masks_: got ", tensors.size(), " tensors but ", masks.size(), " masks");
  }
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    const at::Tensor& m = masks[i];
    if (!is_floating(t.scalar_type())) {
      return type_error("apply_channel_masks_: tensors[", i, "] must be float16, bfloat16, float32 or float64, got ",
                        t.scalar_type());
    }
    if (!at::isFloatingType(m.scalar_type())) {
      return type_error("apply_channel_masks_: masks[", i, "] must be a floating-point tensor, got ", m.scalar_type());
    }
    if (t.dim() < 1) {
      return value_error("apply_channel_masks_: tensors[", i, "] must have a unit dimension 0, got a 0-D tensor");
    }
    if (m.dim() != 1) return value_error("apply_channel_masks_: masks[", i, "] must be 1-D, got shape ", m.sizes());
    if (m.size(0) != t.size(0)) {
      return value_error("apply_channel_masks_: masks[", i, "] has ", m.size(0), " values but tensors[", i, "] has ",
                         t.size(0), " units in dim 0");
    }
    if (t.device() != m.device()) {
      return value_error("apply_channel_masks_: tensors[", i, "] is on ", t.device(), " but masks[", i, "] is on ",
                         m.device());
    }
    if (t.device() != tensors[0].device()) {
      return value_error("apply_channel_masks_: tensors[", i, "] is on ", t.device(), " but tensors[0] is on ",
                         tensors[0].device());
    }
  }
  return {};
}

inline void throw_if(const ArgProblem& problem) {
  TORCH_CHECK_TYPE(problem.kind != "TypeError", problem.message);
  TORCH_CHECK_VALUE(problem.kind != "ValueError", problem.message);
}

}  // namespace dfmu
