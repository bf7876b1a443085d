// C++ test of the dfmu_ext ops on CPU, called through torch's dispatcher exactly as a libtorch user
// (or torch.ops.dfmu_ext.*) would, against plain ATen references computed in float64.
// Built and run by CMakeLists.txt (ctest); exits nonzero with a message on the first failures.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <iostream>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

namespace {

int g_failures = 0;
int g_checks = 0;

void check(bool ok, const std::string& what) {
  ++g_checks;
  if (!ok) {
    ++g_failures;
    std::cerr << "FAIL: " << what << std::endl;
  }
}

std::string describe_diff(const at::Tensor& got, const at::Tensor& want) {
  std::ostringstream os;
  if (got.sizes() != want.sizes()) {
    os << "shape " << got.sizes() << " vs expected " << want.sizes();
  } else {
    os << "max |diff| = " << (got.to(at::kDouble) - want.to(at::kDouble)).abs().max().item<double>();
  }
  return os.str();
}

void check_close(const at::Tensor& got, const at::Tensor& want, double rtol, double atol, const std::string& what) {
  const bool same_shape = got.sizes() == want.sizes();
  const bool ok = same_shape && at::allclose(got.to(at::kDouble), want.to(at::kDouble), rtol, atol);
  check(ok, what + ": " + describe_diff(got, want));
}

using BlockImportanceFn = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                     int64_t, int64_t, c10::string_view, const std::optional<at::Tensor>&,
                                     const std::optional<at::Tensor>&, bool);
using ApplyMasksFn = void(at::TensorList, at::TensorList);

c10::TypedOperatorHandle<BlockImportanceFn> block_importance_op() {
  return c10::Dispatcher::singleton()
      .findSchemaOrThrow("dfmu_ext::block_importance", "")
      .typed<BlockImportanceFn>();
}

c10::TypedOperatorHandle<ApplyMasksFn> apply_channel_masks_op() {
  return c10::Dispatcher::singleton()
      .findSchemaOrThrow("dfmu_ext::apply_channel_masks_", "")
      .typed<ApplyMasksFn>();
}

// out[k, c] = sum_{n : groups[n] == k} r( sum over all dims but 0 and channel_dim of a * g ), in float64.
at::Tensor reference_importance(const at::Tensor& act, const at::Tensor& grad, const std::optional<at::Tensor>& groups,
                                int64_t num_groups, int64_t channel_dim, const std::string& reduce) {
  const int64_t nd = act.dim();
  const int64_t cd = channel_dim < 0 ? channel_dim + nd : channel_dim;
  at::Tensor prod = act.to(at::kDouble) * grad.to(at::kDouble);
  std::vector<int64_t> dims;
  for (int64_t d = 1; d < nd; ++d) {
    if (d != cd) dims.push_back(d);
  }
  at::Tensor s = dims.empty() ? prod : prod.sum(dims);  // (N, C)
  if (reduce == "abs") s = s.abs();
  else if (reduce == "square") s = s * s;
  at::Tensor ids = groups.has_value() ? groups->to(at::kLong)
                                      : at::zeros({act.size(0)}, at::TensorOptions().dtype(at::kLong));
  return at::zeros({num_groups, act.size(cd)}, s.options()).index_add_(0, ids, s);
}

void test_block_importance() {
  auto op = block_importance_op();
  check(op.hasKernelForDispatchKey(c10::DispatchKey::CPU), "block_importance has a CPU kernel");

  const int64_t N = 7, C = 5, H = 4, W = 3, K = 3;
  at::Tensor groups = at::tensor(std::vector<int64_t>{2, 0, 1, 0, 2, 2, 1});
  for (at::ScalarType dtype : {at::kFloat, at::kDouble}) {
    const auto opts = at::TensorOptions().dtype(dtype);
    const double rtol = dtype == at::kDouble ? 1e-12 : 1e-5;
    const double atol = dtype == at::kDouble ? 1e-12 : 1e-5;
    const at::ScalarType out_dtype = dtype == at::kDouble ? at::kDouble : at::kFloat;
    at::Tensor act = at::randn({N, C, H, W}, opts);
    at::Tensor grad = at::randn({N, C, H, W}, opts);
    for (bool channels_last : {false, true}) {
      at::Tensor a = channels_last ? act.contiguous(at::MemoryFormat::ChannelsLast) : act;
      at::Tensor g = channels_last ? grad.contiguous(at::MemoryFormat::ChannelsLast) : grad;
      const std::string tag = std::string("block_importance ") + c10::toString(dtype) +
                              (channels_last ? " channels_last" : " contiguous");
      for (const char* reduce : {"abs", "square", "signed"}) {
        at::Tensor got = op.call(a, g, groups, K, 1, reduce, std::nullopt, std::nullopt, true);
        check(got.scalar_type() == out_dtype, tag + " " + reduce + ": output dtype");
        check_close(got, reference_importance(act, grad, groups, K, 1, reduce), rtol, atol,
                    tag + " reduce=" + reduce + " groups");
      }
      at::Tensor got = op.call(a, g, std::nullopt, 1, 1, "abs", std::nullopt, std::nullopt, true);
      check_close(got, reference_importance(act, grad, std::nullopt, 1, 1, "abs"), rtol, atol,
                  tag + " reduce=abs no groups");
    }
    // (N, T, C) sequence activations, channel last: the channels-inner layout without a copy.
    at::Tensor seq_a = at::randn({N, 6, C}, opts), seq_g = at::randn({N, 6, C}, opts);
    check_close(op.call(seq_a, seq_g, groups.to(at::kInt), K, -1, "abs", std::nullopt, std::nullopt, true),
                reference_importance(seq_a, seq_g, groups, K, -1, "abs"), rtol, atol,
                std::string("block_importance ") + c10::toString(dtype) + " (N,T,C) channel_dim=-1 int32 groups");
    // (N, C) linear outputs.
    at::Tensor lin_a = at::randn({N, C}, opts), lin_g = at::randn({N, C}, opts);
    check_close(op.call(lin_a, lin_g, groups, K, 1, "abs", std::nullopt, std::nullopt, true),
                reference_importance(lin_a, lin_g, groups, K, 1, "abs"),
                rtol, atol, std::string("block_importance ") + c10::toString(dtype) + " (N,C)");
    // A folded affine (an eval-mode BatchNorm): the op scores act * scale + shift.
    at::Tensor scale = at::randn({C}, opts), shift = at::randn({C}, opts);
    at::Tensor folded = act * scale.view({1, C, 1, 1}) + shift.view({1, C, 1, 1});
    check_close(op.call(act, grad, groups, K, 1, "abs", scale, shift, true),
                reference_importance(folded, grad, groups, K, 1, "abs"), rtol, atol,
                std::string("block_importance ") + c10::toString(dtype) + " act_scale/act_shift");
  }
}

void test_apply_channel_masks() {
  auto op = apply_channel_masks_op();
  check(op.hasKernelForDispatchKey(c10::DispatchKey::CPU), "apply_channel_masks_ has a CPU kernel");

  at::Tensor w = at::randn({8, 3, 3, 3});                                                   // conv weight
  at::Tensor w_cl = at::randn({8, 4, 2, 2}).contiguous(at::MemoryFormat::ChannelsLast);      // channels_last
  at::Tensor b = at::randn({8}, at::TensorOptions().dtype(at::kDouble));                     // bias, float64
  at::Tensor m = at::tensor(std::vector<float>{1.f, 0.f, 0.5f, 1.f, 0.f, 2.f, 1.f, 0.25f});
  at::Tensor m_b = at::tensor(std::vector<float>{0.f, 1.f, 1.f, 0.f, 0.75f, 1.f, 0.f, 1.f});
  const at::Tensor want_w = w * m.view({-1, 1, 1, 1});
  const at::Tensor want_w_cl = w_cl * m.view({-1, 1, 1, 1});
  const at::Tensor want_b = b * m_b.to(at::kDouble);
  const void* w_ptr = w.data_ptr();
  const void* b_ptr = b.data_ptr();

  op.call({w, w_cl, b}, {m, m, m_b});
  check(w.data_ptr() == w_ptr && b.data_ptr() == b_ptr, "apply_channel_masks_ works in place");
  check_close(w, want_w, 1e-6, 1e-7, "apply_channel_masks_ contiguous float32 weight");
  check_close(w_cl, want_w_cl, 1e-6, 1e-7, "apply_channel_masks_ channels_last float32 weight");
  check(w_cl.is_contiguous(at::MemoryFormat::ChannelsLast), "apply_channel_masks_ keeps channels_last");
  check_close(b, want_b, 1e-12, 1e-12, "apply_channel_masks_ float64 bias");
}

template <typename F>
void check_throws(F&& f, const std::string& message_part, const std::string& what) {
  try {
    f();
  } catch (const c10::Error& e) {
    const std::string msg = e.what_without_backtrace();
    check(msg.find(message_part) != std::string::npos,
          what + ": threw c10::Error but its message lacks \"" + message_part + "\": " + msg);
    return;
  } catch (const std::exception& e) {
    check(false, what + ": threw a non-c10::Error exception: " + e.what());
    return;
  }
  check(false, what + ": did not throw");
}

void test_bad_inputs() {
  auto bi = block_importance_op();
  at::Tensor a = at::randn({4, 3, 2}), g = at::randn({4, 3, 5});
  check_throws([&] { bi.call(a, g, std::nullopt, 1, 1, "abs", std::nullopt, std::nullopt, true); }, "same shape",
               "block_importance with mismatched act/grad shapes");
  check_throws([&] { bi.call(a, a, std::nullopt, 1, 1, "mean", std::nullopt, std::nullopt, true); }, "reduce must be",
               "block_importance with an unknown reduce");

  auto am = apply_channel_masks_op();
  at::Tensor t = at::randn({4, 2}), t2 = at::randn({5});
  const at::Tensor t_before = t.clone(), t2_before = t2.clone();
  check_throws([&] { am.call({t, t2}, {at::ones({4}), at::ones({3})}); }, "values but tensors[1] has",
               "apply_channel_masks_ with a mask of the wrong length");
  check(at::equal(t, t_before) && at::equal(t2, t2_before), "a rejected apply_channel_masks_ leaves tensors untouched");
}

}  // namespace

int main() {
  try {
    at::manual_seed(0);
    test_block_importance();
    test_apply_channel_masks();
    test_bad_inputs();
  } catch (const std::exception& e) {
    // findSchemaOrThrow lands here when libdfmu_ext_ops.so was not loaded (ops not registered).
    std::cerr << "FAIL: unexpected exception: " << e.what() << std::endl;
    return 1;
  }
  if (g_failures != 0) {
    std::cerr << g_failures << " of " << g_checks << " checks FAILED" << std::endl;
    return 1;
  }
  std::cout << "test_cpu_ops: all " << g_checks << " checks passed" << std::endl;
  return 0;
}
