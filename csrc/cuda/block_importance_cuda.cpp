// Host side of block_importance on CUDA: validation and layout (shared with the CPU kernel),
// buffers, group segments, and the two kernel launches of block_importance_kernels.cu.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS  // per-op headers keep the build fast
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../block_importance.h"
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

at::Tensor block_importance_cuda(const at::Tensor& act, const at::Tensor& grad,
                                 const std::optional<at::Tensor>& groups, int64_t num_groups,
                                 int64_t channel_dim, c10::string_view reduce,
                                 const std::optional<at::Tensor>& act_scale,
                                 const std::optional<at::Tensor>& act_shift, bool check_range) {
  TORCH_CHECK_VALUE(act.is_cuda(), "block_importance: expected CUDA tensors, got act on ", act.device());
  const c10::cuda::CUDAGuard guard(act.device());
  ImportanceProblem p = canonicalize(act, grad, channel_dim, std::string(reduce));
  // The sorting path (many groups) syncs in bincount anyway, and needs ids in range to segment.
  static_assert(cuda::kMaxDirectGroups == kMaxUncheckedGroups, "one rule for when group ids are checked");
  check_groups(groups, p.N, num_groups, act, check_range);
  const at::Tensor scale = affine_param(act_scale, "act_scale", p.C, act, p.out_dtype);
  const at::Tensor shift = affine_param(act_shift, "act_shift", p.C, act, p.out_dtype);
  at::Tensor out = at::empty({num_groups, p.C}, act.options().dtype(p.out_dtype));
  if (p.N == 0 || p.C == 0 || p.R == 0) return out.zero_();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, act.device().index()));

  const cuda::DotsProblem problem{to_kernel_dtype(p.act.scalar_type()), p.act.const_data_ptr(),
                                  p.grad.const_data_ptr(), p.N, p.C, p.R,
                                  p.layout == Layout::kChannelsOuter,
                                  scale.defined() ? scale.const_data_ptr() : nullptr,
                                  shift.defined() ? shift.const_data_ptr() : nullptr};
  const int64_t splits = cuda::importance_splits(problem, sms);
  at::Tensor partial = at::empty({splits, p.N, p.C}, out.options());
  cuda::launch_importance_dots(problem, sms, splits, partial.mutable_data_ptr(), stream);
  const bool is_double = p.out_dtype == at::kDouble;
  if (num_groups <= cuda::kMaxDirectGroups) {
    // Few groups (forget/retain, or one per class): read the ids directly, no sort, no extra sync.
    at::Tensor ids = groups.has_value() ? groups->to(at::kLong).contiguous() : at::Tensor();
    const int64_t chunks = cuda::group_reduce_direct_chunks(p.N, p.C, sms);
    at::Tensor workspace = chunks > 1 ? at::empty({chunks, num_groups, p.C}, out.options()) : at::Tensor();
    cuda::launch_group_reduce_direct(is_double, partial.const_data_ptr(), splits, p.N, p.C,
                                     ids.defined() ? ids.const_data_ptr<int64_t>() : nullptr, num_groups,
                                     int(p.reduce), chunks, workspace.defined() ? workspace.mutable_data_ptr() : nullptr,
                                     out.mutable_data_ptr(), stream);
  } else {
    GroupSegments seg = group_segments(groups, p.N, num_groups, act.device());
    cuda::launch_group_reduce(is_double, partial.const_data_ptr(), splits, p.N, p.C,
                              seg.perm.defined() ? seg.perm.const_data_ptr<int64_t>() : nullptr,
                              seg.offsets.const_data_ptr<int64_t>(), num_groups, int(p.reduce),
                              out.mutable_data_ptr(), stream);
  }
  return out;
}

}  // namespace
}  // namespace dfmu

TORCH_LIBRARY_IMPL(dfmu_ext, CUDA, m) { m.impl("block_importance", &dfmu::block_importance_cuda); }
