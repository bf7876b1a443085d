// CPU kernel of apply_channel_masks_: every (tensor, run of units) of the whole list becomes one
// work item of a single parallel region, so small tensors do not each pay a parallel start-up.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS  // per-op headers keep the build fast
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../channel_masks.h"

namespace dfmu {
namespace {

struct WorkItem {
  int64_t tensor;      // index into the dense list
  int64_t unit_begin;  // [unit_begin, unit_end) of that tensor
  int64_t unit_end;
};

template <typename scalar_t, typename mask_t>
inline void scale_units(scalar_t* data, const mask_t* mask, int64_t inner, int64_t u0, int64_t u1) {
  for (int64_t u = u0; u < u1; ++u) {
    const mask_t m = mask[u];
    if (m == mask_t(1)) continue;  // x * 1 == x: a kept unit costs no memory traffic at all
    scalar_t* row = data + u * inner;
    for (int64_t j = 0; j < inner; ++j) row[j] = static_cast<scalar_t>(static_cast<mask_t>(row[j]) * m);
  }
}

// The masking itself, on arguments already validated.
void masks_cpu(at::TensorList tensors, at::TensorList masks) {
  // Masks in op-math precision; kept alive here for the duration of the call.
  std::vector<at::Tensor> dense, dense_masks;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    if (t.numel() == 0) continue;
    const at::ScalarType math = mask_math_dtype(t.scalar_type());
    // Skip the dispatcher round trips when the mask is already usable (the common case).
    at::Tensor m = masks[i].scalar_type() == math ? masks[i] : masks[i].to(math);
    if (!m.is_contiguous()) m = m.contiguous();
    if (units_are_outer_blocks(t)) {
      dense.push_back(t);
      dense_masks.push_back(m);
    } else {
      // Overlapping or oddly strided views: broadcasting through ATen is correct for any strides.
      std::vector<int64_t> shape(t.dim(), 1);
      shape[0] = t.size(0);
      t.mul_(m.view(shape));
    }
  }
  constexpr int64_t kItemElems = 1 << 15;
  std::vector<WorkItem> items;
  for (size_t i = 0; i < dense.size(); ++i) {
    const int64_t units = dense[i].size(0);
    const int64_t inner = dense[i].numel() / units;
    const int64_t step = std::max<int64_t>(1, kItemElems / inner);
    for (int64_t u = 0; u < units; u += step) items.push_back({int64_t(i), u, std::min(units, u + step)});
  }
  at::parallel_for(0, int64_t(items.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      const WorkItem& it = items[w];
      const at::Tensor& t = dense[it.tensor];
      const int64_t inner = t.numel() / t.size(0);
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "apply_channel_masks_cpu", [&] {
        using mask_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
        scale_units<scalar_t, mask_t>(t.mutable_data_ptr<scalar_t>(), dense_masks[it.tensor].const_data_ptr<mask_t>(),
                                      inner, it.unit_begin, it.unit_end);
      });
    }
  });
}

}  // namespace
}  // namespace dfmu

TORCH_LIBRARY_IMPL(dfmu_ext, CPU, m) {
  m.impl("apply_channel_masks_", &dfmu::checked_apply_channel_masks<c10::DeviceType::CPU, &dfmu::masks_cpu>);
}
