// Host side of apply_channel_masks_ on CUDA: validation (shared with the CPU kernel), masks in
// op-math precision, and one multi-tensor launch sequence per dtype.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS  // per-op headers keep the build fast
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <map>
#include <string>
#include <vector>

#include "../channel_masks.h"
#include "launch.h"

namespace dfmu {
namespace {

cuda::DType to_kernel_dtype(at::ScalarType st) {
  switch (st) {
    case at::kFloat: return cuda::DType::kFloat;
    case at::kDouble: return cuda::DType::kDouble;
    case at::kHalf: return cuda::DType::kHalf;
    default: return cuda::DType::kBFloat16;
  }
}

// The masking itself, on arguments already validated.
void masks_cuda(at::TensorList tensors, at::TensorList masks) {
  if (tensors.empty()) return;
  const c10::cuda::CUDAGuard guard(tensors[0].device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // Converted masks stay referenced until the launches are queued; the caching allocator orders
  // any later reuse of their memory after those launches on this stream.
  std::vector<at::Tensor> keep_alive;
  std::map<at::ScalarType, std::vector<cuda::MaskedTensor>> by_dtype;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    if (t.numel() == 0) continue;
    const at::ScalarType math = mask_math_dtype(t.scalar_type());
    // Skip the dispatcher round trips when the mask is already usable (the common case).
    at::Tensor m = masks[i].scalar_type() == math ? masks[i] : masks[i].to(math);
    if (!m.is_contiguous()) m = m.contiguous();
    if (units_are_outer_blocks(t)) {
      keep_alive.push_back(m);
      by_dtype[t.scalar_type()].push_back({t.data_ptr(), m.const_data_ptr(), t.numel(), t.numel() / t.size(0)});
    } else {
      std::vector<int64_t> shape(t.dim(), 1);
      shape[0] = t.size(0);
      t.mul_(m.view(shape));
    }
  }
  for (const auto& [dtype, list] : by_dtype) cuda::launch_masked_scale(to_kernel_dtype(dtype), list, stream);
}

}  // namespace
}  // namespace dfmu

TORCH_LIBRARY_IMPL(dfmu_ext, CUDA, m) {
  m.impl("apply_channel_masks_", &dfmu::checked_apply_channel_masks<c10::DeviceType::CUDA, &dfmu::masks_cuda>);
}
