// Argument checking and layout canonicalisation for block_importance, shared by the CPU and CUDA
// kernels so that both reject exactly the same inputs with exactly the same messages.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/aminmax.h>
#include <ATen/ops/bincount.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/cumsum.h>
#include <ATen/ops/full.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/zeros.h>
#include <c10/core/ScalarType.h>

#include <optional>

#include <string>
#include <vector>

namespace dfmu {

enum class Reduce : int { Abs = 0, Square = 1, Signed = 2 };

inline Reduce parse_reduce(const std::string& reduce) {
  if (reduce == "abs") return Reduce::Abs;
  if (reduce == "square") return Reduce::Square;
  if (reduce == "signed") return Reduce::Signed;
  TORCH_CHECK_VALUE(false, "block_importance: reduce must be 'abs', 'square' or 'signed', got '", reduce, "'");
}

// The two memory orders the kernels read without a copy.
//   kChannelsOuter: [N][C][R]  (NCHW-contiguous conv activations, (N, C) linear outputs)
//   kChannelsInner: [N][R][C]  (channels_last conv activations, (N, T, C) sequence outputs)
enum class Layout { kChannelsOuter, kChannelsInner };

struct ImportanceProblem {
  at::Tensor act;   // viewed as 3-D in `layout` order, contiguous
  at::Tensor grad;  // same view and layout as act
  Layout layout;
  int64_t N, C, R;
  Reduce reduce;
  at::ScalarType out_dtype;
};

// Above this many groups the CUDA kernel segments the batch by sorting, which needs valid ids, so
// ids are then always range-checked; every backend follows the same rule, for one behaviour.
constexpr int64_t kMaxUncheckedGroups = 32;

// check_range=false skips the range check (and its device sync on CUDA) for at most
// kMaxUncheckedGroups groups: the kernels then ignore ids outside [0, num_groups) instead of
// reading out of bounds.
inline void check_groups(const std::optional<at::Tensor>& groups, int64_t N, int64_t num_groups,
                         const at::Tensor& act, bool check_range = true) {
  check_range = check_range || num_groups > kMaxUncheckedGroups;
  TORCH_CHECK_VALUE(num_groups >= 1, "block_importance: num_groups must be >= 1, got ", num_groups);
  if (!groups.has_value()) return;
  const at::Tensor& g = *groups;
  TORCH_CHECK_TYPE(g.scalar_type() == at::kLong || g.scalar_type() == at::kInt,
                   "block_importance: groups must be an int64 or int32 tensor, got ", g.scalar_type());
  TORCH_CHECK_VALUE(g.dim() == 1 && g.size(0) == N, "block_importance: groups must be 1-D with one id per "
                    "sample (", N, "), got shape ", g.sizes());
  TORCH_CHECK_VALUE(g.device() == act.device(), "block_importance: groups is on ", g.device(),
                    " but act is on ", act.device());
  if (N == 0 || !check_range) return;
  // One small reduction and one device-to-host copy (a single sync on CUDA).
  auto mm = at::aminmax(g);
  const at::Tensor range = at::cat({std::get<0>(mm).reshape({1}), std::get<1>(mm).reshape({1})}).to(at::kLong).cpu();
  const int64_t lo = range.const_data_ptr<int64_t>()[0];
  const int64_t hi = range.const_data_ptr<int64_t>()[1];
  TORCH_CHECK_VALUE(lo >= 0 && hi < num_groups, "block_importance: group ids must lie in [0, num_groups=",
                    num_groups, "), got ids in [", lo, ", ", hi, "]");
}

// act_scale / act_shift: optional per-unit (C,) factors of the activation a = act * scale + shift,
// returned contiguous in the accumulation dtype (undefined when absent: scale 1, shift 0).
inline at::Tensor affine_param(const std::optional<at::Tensor>& t, const char* name, int64_t C,
                               const at::Tensor& act, at::ScalarType acc_dtype) {
  if (!t.has_value()) return at::Tensor();
  const at::Tensor& v = *t;
  TORCH_CHECK_TYPE(at::isFloatingType(v.scalar_type()), "block_importance: ", name,
                   " must be a floating-point tensor, got ", v.scalar_type());
  TORCH_CHECK_VALUE(v.dim() == 1 && v.size(0) == C, "block_importance: ", name, " must be 1-D with one value per "
                    "unit (", C, "), got shape ", v.sizes());
  TORCH_CHECK_VALUE(v.device() == act.device(), "block_importance: ", name, " is on ", v.device(),
                    " but act is on ", act.device());
  return v.to(acc_dtype).contiguous();
}

// Moves the channel axis next to the batch axis (channels outer) or to the end (channels inner),
// whichever is already contiguous in memory, so no data is copied for the common layouts.
inline ImportanceProblem canonicalize(const at::Tensor& act, const at::Tensor& grad, int64_t channel_dim,
                                      const std::string& reduce) {
  TORCH_CHECK_VALUE(act.dim() >= 2, "block_importance: act must have a batch and a channel dimension, got "
                    "shape ", act.sizes());
  TORCH_CHECK_VALUE(act.sizes() == grad.sizes(), "block_importance: act and grad must have the same shape, got ",
                    act.sizes(), " and ", grad.sizes());
  TORCH_CHECK_VALUE(act.device() == grad.device(), "block_importance: act is on ", act.device(),
                    " but grad is on ", grad.device());
  TORCH_CHECK_TYPE(act.scalar_type() == grad.scalar_type(), "block_importance: act and grad must have the same "
                   "dtype, got ", act.scalar_type(), " and ", grad.scalar_type());
  const auto st = act.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
                   "block_importance: act and grad must be float16, bfloat16, float32 or float64, got ", st);
  const int64_t nd = act.dim();
  TORCH_CHECK_VALUE(channel_dim >= -nd && channel_dim < nd, "block_importance: channel_dim ", channel_dim,
                    " is out of range for a ", nd, "-D act");
  const int64_t cd = channel_dim < 0 ? channel_dim + nd : channel_dim;
  TORCH_CHECK_VALUE(cd != 0, "block_importance: channel_dim must not be the batch dimension 0");

  ImportanceProblem p;
  p.reduce = parse_reduce(reduce);
  p.out_dtype = st == at::kDouble ? at::kDouble : at::kFloat;
  p.N = act.size(0);
  p.C = act.size(cd);
  p.R = 1;
  std::vector<int64_t> outer{0, cd}, inner{0};
  for (int64_t d = 1; d < nd; ++d) {
    if (d == cd) continue;
    outer.push_back(d);
    inner.push_back(d);
    p.R *= act.size(d);
  }
  inner.push_back(cd);

  auto as_outer = [&](const at::Tensor& t) { return t.permute(outer); };
  auto as_inner = [&](const at::Tensor& t) { return t.permute(inner); };
  if (as_outer(act).is_contiguous()) {
    p.layout = Layout::kChannelsOuter;
  } else if (as_inner(act).is_contiguous()) {
    p.layout = Layout::kChannelsInner;
  } else {
    p.layout = Layout::kChannelsOuter;  // arbitrary strides: one copy into the outer order
  }
  const bool outer_layout = p.layout == Layout::kChannelsOuter;
  auto view3 = [&](const at::Tensor& t) {
    at::Tensor v = (outer_layout ? as_outer(t) : as_inner(t)).contiguous();  // no-op when already dense
    return outer_layout ? v.view({p.N, p.C, p.R}) : v.view({p.N, p.R, p.C});
  };
  p.act = view3(act);
  p.grad = view3(grad);
  return p;
}

// Segments of the batch per group, in a deterministic order: `perm` lists sample indices sorted
// stably by group id, samples of group k are perm[offsets[k] : offsets[k+1]].
struct GroupSegments {
  at::Tensor perm;     // int64 (N,), or undefined when all samples are in group 0
  at::Tensor offsets;  // int64 (K+1,)
};

inline GroupSegments group_segments(const std::optional<at::Tensor>& groups, int64_t N, int64_t K,
                                    const at::Device& device) {
  GroupSegments s;
  auto opts = at::TensorOptions().dtype(at::kLong).device(device);
  if (!groups.has_value() || N == 0) {
    s.offsets = at::cat({at::zeros({1}, opts), at::full({K}, N, opts)});
    return s;
  }
  at::Tensor g = groups->to(at::kLong);
  s.perm = std::get<1>(at::sort(g, /*stable=*/true, /*dim=*/0, /*descending=*/false)).contiguous();
  at::Tensor counts = at::bincount(g, /*weights=*/{}, /*minlength=*/K);
  s.offsets = at::cat({at::zeros({1}, opts), at::cumsum(counts, 0)}).contiguous();
  return s;
}

}  // namespace dfmu
