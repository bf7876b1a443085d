// CPU kernel of block_importance: per-(sample, unit) dot products in fp32 (fp64 for fp64 input),
// then a per-group sum over samples in a fixed order, so results do not depend on thread count.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS  // per-op headers keep the build fast
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../block_importance.h"

namespace dfmu {
namespace {

// Dot product of two contiguous runs. Eight independent accumulators break the add dependency
// chain and let the compiler keep them in vector registers without reassociating a single sum.
template <typename scalar_t, typename acc_t>
inline acc_t dot_run(const scalar_t* a, const scalar_t* g, int64_t len) {
  constexpr int kLanes = 8;
  acc_t acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= len; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      acc[l] += static_cast<acc_t>(a[i + l]) * static_cast<acc_t>(g[i + l]);
    }
  }
  for (; i < len; ++i) acc[0] += static_cast<acc_t>(a[i]) * static_cast<acc_t>(g[i]);
  acc_t total = 0;
  for (int l = 0; l < kLanes; ++l) total += acc[l];
  return total;
}

template <typename acc_t>
inline acc_t apply_reduce(acc_t s, Reduce r) {
  switch (r) {
    case Reduce::Abs: return std::abs(s);
    case Reduce::Square: return s * s;
    default: return s;
  }
}

// s[n, c] for the [N][C][R] layout: one contiguous run of R per (n, c).
template <typename scalar_t, typename acc_t>
void dots_channels_outer(const scalar_t* a, const scalar_t* g, int64_t rows, int64_t R, acc_t* s) {
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(R, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) s[row] = dot_run<scalar_t, acc_t>(a + row * R, g + row * R, R);
  });
}

// s[n, c] for the [N][R][C] layout: accumulate whole channel rows, vectorised across channels.
template <typename scalar_t, typename acc_t>
void dots_channels_inner(const scalar_t* a, const scalar_t* g, int64_t N, int64_t R, int64_t C, acc_t* s) {
  constexpr int64_t kTile = 256;
  const int64_t tiles = (C + kTile - 1) / kTile;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(R * std::min(C, kTile), 1));
  at::parallel_for(0, N * tiles, grain, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / tiles;
      const int64_t c0 = (item % tiles) * kTile;
      const int64_t width = std::min(kTile, C - c0);
      acc_t* out = s + n * C + c0;
      std::fill(out, out + width, acc_t(0));
      for (int64_t r = 0; r < R; ++r) {
        const scalar_t* ar = a + (n * R + r) * C + c0;
        const scalar_t* gr = g + (n * R + r) * C + c0;
        for (int64_t c = 0; c < width; ++c) out[c] += static_cast<acc_t>(ar[c]) * static_cast<acc_t>(gr[c]);
      }
    }
  });
}

// Calls body(r) with r the reduce function as a compile-time functor, so the inner loops below
// vectorise (a runtime switch inside them would not).
template <typename acc_t, typename Body>
inline void with_reduce(Reduce reduce, Body&& body) {
  switch (reduce) {
    case Reduce::Abs: return body([](acc_t v) { return std::abs(v); });
    case Reduce::Square: return body([](acc_t v) { return v * v; });
    default: return body([](acc_t v) { return v; });
  }
}

// out[k, c] = sum over the samples of group k, in index order, of r(s[n, c]).
template <typename acc_t>
void group_sum(const acc_t* s, const int64_t* groups, int64_t N, int64_t C, Reduce reduce, acc_t* out) {
  with_reduce<acc_t>(reduce, [&](auto r) {
    at::parallel_for(0, C, std::max<int64_t>(1, 4096 / std::max<int64_t>(N, 1)), [&](int64_t begin, int64_t end) {
      for (int64_t n = 0; n < N; ++n) {
        const acc_t* __restrict__ sn = s + n * C;
        acc_t* __restrict__ ok = out + (groups ? groups[n] : 0) * C;
        for (int64_t c = begin; c < end; ++c) ok[c] += r(sn[c]);
      }
    });
  });
}

// R == 1 (linear outputs): s[n, c] = a[n, c] * g[n, c] needs no buffer; fold it straight into the
// group sums (a buffer as large as the input would cost more in page faults than the arithmetic).
template <typename scalar_t, typename acc_t>
void group_sum_elementwise(const scalar_t* a, const scalar_t* g, const int64_t* groups, int64_t N, int64_t C,
                           Reduce reduce, acc_t* out) {
  with_reduce<acc_t>(reduce, [&](auto r) {
    at::parallel_for(0, C, std::max<int64_t>(1, 4096 / std::max<int64_t>(N, 1)), [&](int64_t begin, int64_t end) {
      for (int64_t n = 0; n < N; ++n) {
        const scalar_t* __restrict__ an = a + n * C;
        const scalar_t* __restrict__ gn = g + n * C;
        acc_t* __restrict__ ok = out + (groups ? groups[n] : 0) * C;
        for (int64_t c = begin; c < end; ++c) ok[c] += r(static_cast<acc_t>(an[c]) * static_cast<acc_t>(gn[c]));
      }
    });
  });
}

at::Tensor block_importance_cpu(const at::Tensor& act, const at::Tensor& grad,
                                const std::optional<at::Tensor>& groups, int64_t num_groups,
                                int64_t channel_dim, c10::string_view reduce) {
  TORCH_CHECK_VALUE(act.device().is_cpu(), "block_importance: expected CPU tensors, got act on ", act.device());
  ImportanceProblem p = canonicalize(act, grad, channel_dim, std::string(reduce));
  check_groups(groups, p.N, num_groups, act);
  at::Tensor out = at::zeros({num_groups, p.C}, act.options().dtype(p.out_dtype));
  if (p.N == 0 || p.C == 0) return out;
  at::Tensor group_ids;
  if (groups.has_value()) group_ids = groups->to(at::kLong).contiguous();
  const int64_t* ids = group_ids.defined() ? group_ids.const_data_ptr<int64_t>() : nullptr;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.act.scalar_type(), "block_importance_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* a = p.act.const_data_ptr<scalar_t>();
    const scalar_t* g = p.grad.const_data_ptr<scalar_t>();
    if (p.R == 1) {
      group_sum_elementwise<scalar_t, acc_t>(a, g, ids, p.N, p.C, p.reduce, out.mutable_data_ptr<acc_t>());
      return;
    }
    at::Tensor s = at::empty({p.N, p.C}, out.options());
    acc_t* sp = s.mutable_data_ptr<acc_t>();
    if (p.layout == Layout::kChannelsOuter) {
      dots_channels_outer<scalar_t, acc_t>(a, g, p.N * p.C, p.R, sp);
    } else {
      dots_channels_inner<scalar_t, acc_t>(a, g, p.N, p.R, p.C, sp);
    }
    group_sum<acc_t>(sp, ids, p.N, p.C, p.reduce, out.mutable_data_ptr<acc_t>());
  });
  return out;
}

}  // namespace
}  // namespace dfmu

TORCH_LIBRARY_IMPL(dfmu_ext, CPU, m) { m.impl("block_importance", &dfmu::block_importance_cpu); }
