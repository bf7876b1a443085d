// CPU kernel of block_importance: per-(sample, unit) dot products in fp32 (fp64 for fp64 input),
// then a per-group sum over samples in a fixed order, so results do not depend on thread count.
// float16 input has a second build of the three inner loops for x86-64 CPUs with F16C (chosen at
// run time); it gives the same bits as the portable loops.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS  // per-op headers keep the build fast
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <c10/util/bit_cast.h>

#include <algorithm>
#include <cstdint>
#include <cmath>
#include <cstdlib>
#include <string_view>
#include <type_traits>
#include <vector>

// x86-64 with GCC or Clang: float16 loops also get an F16C build (vcvtph2ps, 8 halves per instruction),
// compiled through per-function target attributes (the rest of the file stays baseline x86-64, so the
// library loads on any x86-64 CPU) and chosen at run time by a CPU check.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define DFMU_F16C 1
#include <immintrin.h>
#define DFMU_F16C_TARGET __attribute__((target("avx,f16c")))
#else
#define DFMU_F16C 0
#endif

#include "../block_importance.h"

namespace dfmu {
namespace {

// float16 -> float32 without branches, exactly (every half is a float): the portable kernels' conversion
// (non-x86 CPUs, x86 CPUs without F16C, DFMU_CPU_F16C=0). c10::Half's own conversion
// has data-dependent branches the compiler cannot vectorise, which made the fp16 kernels 4-5x slower
// than eager PyTorch (whose kernels are built per CPU capability). Here every case is arithmetic on
// all-ones / all-zeros masks (ternaries were turned back into branches by the compiler):
//   normal:    move exponent and mantissa into place and re-bias the exponent by 127 - 15;
//   inf / NaN: re-bias once more so the exponent is all ones (the mantissa, i.e. the NaN payload, stays);
//   subnormal: m * 2^-24 = (1 + m/1024) * 2^-14 - 2^-14, an exact float subtraction that never forms
//              an fp32 denormal (so it is right even with flush-to-zero / denormals-are-zero set).
// The subtraction is unconditional (x - 0 = x otherwise): under the default -ftrapping-math a
// conditional float operation is not if-converted either.
inline float half_to_float(c10::Half h) {
  const uint32_t bits = h.x;
  const uint32_t exp = bits & 0x7c00u;
  const uint32_t inf_nan = 0u - uint32_t(exp == 0x7c00u);
  const uint32_t subnormal = 0u - uint32_t(exp == 0);
  const uint32_t u = ((bits & 0x7fffu) << 13) + ((127u - 15u) << 23) + (inf_nan & ((128u - 16u) << 23)) +
                     (subnormal & (1u << 23));
  const float f = c10::bit_cast<float>(u) - c10::bit_cast<float>(subnormal & 0x38800000u);  // 2^-14
  return c10::bit_cast<float>(c10::bit_cast<uint32_t>(f) | ((bits & 0x8000u) << 16));
}

// An input element in accumulation precision.
template <typename acc_t, typename scalar_t>
inline acc_t to_acc(scalar_t x) {
  if constexpr (std::is_same_v<scalar_t, c10::Half>) {
    return static_cast<acc_t>(half_to_float(x));
  } else {
    return static_cast<acc_t>(x);
  }
}

// Whether float16 inputs take the F16C kernels: the CPU has AVX + F16C (libgcc's check includes the
// OS's YMM state support) and DFMU_CPU_F16C is not "0" (a switch for tests and benchmarks: the
// portable kernels then run on any CPU). Read per call, not cached, so a test can flip it.
// Both builds give bit-identical results: the F16C kernels do the same float32 multiplies and adds
// in the same order, lane for lane, as the portable ones (no FMA: fused products would round
// differently, which is also why the target attribute does not enable "fma", under which GCC
// contracts a * b + c on its own).
inline bool use_f16c() {
#if DFMU_F16C
  static const bool cpu_has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c");
  }();
  if (!cpu_has) return false;
  const char* env = std::getenv("DFMU_CPU_F16C");
  return env == nullptr || std::string_view(env) != "0";
#else
  return false;
#endif
}

// The activation as the op sees it: act * scale + shift, or act itself when no affine was given
// (a compile-time choice, so the plain path costs nothing extra).
template <bool kAffine, typename acc_t, typename scalar_t>
inline acc_t activation(scalar_t x, acc_t scale, acc_t shift) {
  if constexpr (kAffine) {
    return to_acc<acc_t>(x) * scale + shift;
  } else {
    return to_acc<acc_t>(x);
  }
}

// Per-unit affine factors of one op call; null pointers mean scale 1 / shift 0.
template <typename acc_t>
struct Affine {
  const acc_t* scale = nullptr;
  const acc_t* shift = nullptr;
  bool any() const { return scale != nullptr || shift != nullptr; }
  acc_t scale_of(int64_t c) const { return scale ? scale[c] : acc_t(1); }
  acc_t shift_of(int64_t c) const { return shift ? shift[c] : acc_t(0); }
};

// Dot product of two contiguous runs. Eight independent accumulators break the add dependency
// chain and let the compiler keep them in vector registers without reassociating a single sum.
template <bool kAffine, typename scalar_t, typename acc_t>
inline acc_t dot_run(const scalar_t* a, const scalar_t* g, int64_t len, acc_t scale, acc_t shift) {
  constexpr int kLanes = 8;
  acc_t acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= len; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      acc[l] += activation<kAffine>(a[i + l], scale, shift) * to_acc<acc_t>(g[i + l]);
    }
  }
  for (; i < len; ++i) acc[0] += activation<kAffine>(a[i], scale, shift) * to_acc<acc_t>(g[i]);
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

#if DFMU_F16C
// ---------------------------------------------------------------------------------------------
// F16C kernels for float16 input. Each one mirrors a portable loop below, operation for operation
// (same accumulators, same association, same tail handling), so both give the same bits; only the
// half -> float conversion differs, and both conversions are exact. Each loop is a function of its own
// with the target attribute, called from at::parallel_for's lambdas (a lambda does not inherit its
// enclosing function's target, so the loops cannot live in them).
// ---------------------------------------------------------------------------------------------

DFMU_F16C_TARGET inline __m256 load8_f16c(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

DFMU_F16C_TARGET inline float load1_f16c(const c10::Half* p) {
  return _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(p->x)));
}

template <bool kAffine>
DFMU_F16C_TARGET inline __m256 activation8_f16c(const c10::Half* p, __m256 scale, __m256 shift) {
  const __m256 x = load8_f16c(p);
  if constexpr (kAffine) {
    return _mm256_add_ps(_mm256_mul_ps(x, scale), shift);
  } else {
    return x;
  }
}

template <bool kAffine>
DFMU_F16C_TARGET inline float activation1_f16c(const c10::Half* p, float scale, float shift) {
  if constexpr (kAffine) {
    return load1_f16c(p) * scale + shift;
  } else {
    return load1_f16c(p);
  }
}

template <Reduce kReduce>
DFMU_F16C_TARGET inline __m256 reduce8_f16c(__m256 v) {
  if constexpr (kReduce == Reduce::Abs) {
    return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), v);  // what std::abs does: clear the sign bit
  } else if constexpr (kReduce == Reduce::Square) {
    return _mm256_mul_ps(v, v);
  } else {
    return v;
  }
}

template <Reduce kReduce>
DFMU_F16C_TARGET inline float reduce1_f16c(float v) {
  if constexpr (kReduce == Reduce::Abs) {
    return std::abs(v);
  } else if constexpr (kReduce == Reduce::Square) {
    return v * v;
  } else {
    return v;
  }
}

// dot_run<kAffine, c10::Half, float>: its eight accumulators are the eight lanes of one vector.
template <bool kAffine>
DFMU_F16C_TARGET float dot_run_f16c(const c10::Half* a, const c10::Half* g, int64_t len, float scale, float shift) {
  const __m256 vscale = _mm256_set1_ps(scale), vshift = _mm256_set1_ps(shift);
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= len; i += 8) {
    acc = _mm256_add_ps(acc, _mm256_mul_ps(activation8_f16c<kAffine>(a + i, vscale, vshift), load8_f16c(g + i)));
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, acc);
  for (; i < len; ++i) lanes[0] += activation1_f16c<kAffine>(a + i, scale, shift) * load1_f16c(g + i);
  float total = 0;
  for (int l = 0; l < 8; ++l) total += lanes[l];
  return total;
}

// Eight consecutive rows of a short length R = 8m (e.g. 4x4 maps), where dot_run_f16c's serial sum of
// the eight lanes costs more than the row itself: the same accumulator per row, then the 8 x 8 block of
// lanes is transposed so that vector l holds lane l of the eight rows, and adding those vectors in
// lane order 0..7 to zero is each row's own sum ((0 + l0) + l1) + ... + l7, for eight rows at once.
template <bool kAffine>
DFMU_F16C_TARGET void dot_8rows_f16c(const c10::Half* a, const c10::Half* g, int64_t R, int64_t row0, int64_t C,
                                     Affine<float> affine, float* s) {
  __m256 acc[8];
  for (int j = 0; j < 8; ++j) {
    const int64_t row = row0 + j;
    const __m256 vscale = _mm256_set1_ps(affine.scale_of(row % C)), vshift = _mm256_set1_ps(affine.shift_of(row % C));
    const c10::Half* ar = a + row * R;
    const c10::Half* gr = g + row * R;
    __m256 v = _mm256_setzero_ps();
    for (int64_t i = 0; i < R; i += 8) {
      v = _mm256_add_ps(v, _mm256_mul_ps(activation8_f16c<kAffine>(ar + i, vscale, vshift), load8_f16c(gr + i)));
    }
    acc[j] = v;
  }
  const __m256 t0 = _mm256_unpacklo_ps(acc[0], acc[1]), t1 = _mm256_unpackhi_ps(acc[0], acc[1]);
  const __m256 t2 = _mm256_unpacklo_ps(acc[2], acc[3]), t3 = _mm256_unpackhi_ps(acc[2], acc[3]);
  const __m256 t4 = _mm256_unpacklo_ps(acc[4], acc[5]), t5 = _mm256_unpackhi_ps(acc[4], acc[5]);
  const __m256 t6 = _mm256_unpacklo_ps(acc[6], acc[7]), t7 = _mm256_unpackhi_ps(acc[6], acc[7]);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0)), u1 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0)), u3 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 u4 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(1, 0, 1, 0)), u5 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 u6 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(1, 0, 1, 0)), u7 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(3, 2, 3, 2));
  // lane l of rows 0..7, for l = 0..7
  const __m256 lane[8] = {_mm256_permute2f128_ps(u0, u4, 0x20), _mm256_permute2f128_ps(u1, u5, 0x20),
                          _mm256_permute2f128_ps(u2, u6, 0x20), _mm256_permute2f128_ps(u3, u7, 0x20),
                          _mm256_permute2f128_ps(u0, u4, 0x31), _mm256_permute2f128_ps(u1, u5, 0x31),
                          _mm256_permute2f128_ps(u2, u6, 0x31), _mm256_permute2f128_ps(u3, u7, 0x31)};
  __m256 total = _mm256_setzero_ps();
  for (int l = 0; l < 8; ++l) total = _mm256_add_ps(total, lane[l]);
  _mm256_storeu_ps(s + row0, total);
}

template <bool kAffine>
DFMU_F16C_TARGET void dots_channels_outer_f16c(const c10::Half* a, const c10::Half* g, int64_t begin, int64_t end,
                                               int64_t C, int64_t R, Affine<float> affine, float* s) {
  if (R % 8 == 0 && R <= 64) {
    for (; begin + 8 <= end; begin += 8) dot_8rows_f16c<kAffine>(a, g, R, begin, C, affine, s);
  }
  for (int64_t row = begin; row < end; ++row) {
    const int64_t c = row % C;
    s[row] = dot_run_f16c<kAffine>(a + row * R, g + row * R, R, affine.scale_of(c), affine.shift_of(c));
  }
}

// One product act * grad (with the affine) at 8 / 1 channels.
template <bool kAffine>
DFMU_F16C_TARGET inline __m256 term8_f16c(const c10::Half* a, const c10::Half* g, const float* scale, const float* shift) {
  const __m256 sc = kAffine ? _mm256_loadu_ps(scale) : _mm256_setzero_ps();
  const __m256 sh = kAffine ? _mm256_loadu_ps(shift) : _mm256_setzero_ps();
  return _mm256_mul_ps(activation8_f16c<kAffine>(a, sc, sh), load8_f16c(g));
}

template <bool kAffine>
DFMU_F16C_TARGET inline float term1_f16c(const c10::Half* a, const c10::Half* g, const float* scale, const float* shift) {
  return activation1_f16c<kAffine>(a, *scale, *shift) * load1_f16c(g);
}

// One (sample, channel tile) of dots_channels_inner: `a`, `g` point at position 0, channel c0 of the
// sample; out[0, width) is zero on entry. Each channel is its own lane: the same sums in the same order.
template <bool kAffine>
DFMU_F16C_TARGET void inner_tile_f16c(const c10::Half* a, const c10::Half* g, int64_t R, int64_t C, int64_t width,
                                      const float* scale, const float* shift, float* out) {
  const int64_t vec_width = width - width % 8;
  int64_t r = 0;
  for (; r + 4 <= R; r += 4) {
    const c10::Half* a0 = a + r * C;
    const c10::Half* g0 = g + r * C;
    const c10::Half *a1 = a0 + C, *a2 = a1 + C, *a3 = a2 + C;
    const c10::Half *g1 = g0 + C, *g2 = g1 + C, *g3 = g2 + C;
    // When the tile is the whole row, the next four positions are the next 8 * C bytes of act and of
    // grad, back to back; they are prefetched in address order, a cache line of each per 8 channels
    // (C / 8 iterations x 64 bytes). The hardware prefetchers do not keep up with the eight
    // interleaved row streams: (64, 197, 768) from DRAM ran at 0.65x the speed without this.
    const bool prefetch = width == C && r + 8 <= R;
    const char* next_a = reinterpret_cast<const char*>(a0 + 4 * C);
    const char* next_g = reinterpret_cast<const char*>(g0 + 4 * C);
    int64_t c = 0;
    for (; c < vec_width; c += 8) {
      if (prefetch) {
        _mm_prefetch(next_a + c * 8, _MM_HINT_T0);
        _mm_prefetch(next_g + c * 8, _MM_HINT_T0);
      }
      const float *sc = scale + c, *sh = shift + c;
      const __m256 sum = _mm256_add_ps(
          _mm256_add_ps(term8_f16c<kAffine>(a0 + c, g0 + c, sc, sh), term8_f16c<kAffine>(a1 + c, g1 + c, sc, sh)),
          _mm256_add_ps(term8_f16c<kAffine>(a2 + c, g2 + c, sc, sh), term8_f16c<kAffine>(a3 + c, g3 + c, sc, sh)));
      _mm256_storeu_ps(out + c, _mm256_add_ps(_mm256_loadu_ps(out + c), sum));
    }
    for (; c < width; ++c) {
      const float *sc = scale + c, *sh = shift + c;
      out[c] += (term1_f16c<kAffine>(a0 + c, g0 + c, sc, sh) + term1_f16c<kAffine>(a1 + c, g1 + c, sc, sh)) +
                (term1_f16c<kAffine>(a2 + c, g2 + c, sc, sh) + term1_f16c<kAffine>(a3 + c, g3 + c, sc, sh));
    }
  }
  for (; r < R; ++r) {
    const c10::Half* ar = a + r * C;
    const c10::Half* gr = g + r * C;
    int64_t c = 0;
    for (; c < vec_width; c += 8) {
      const __m256 t = term8_f16c<kAffine>(ar + c, gr + c, scale + c, shift + c);
      _mm256_storeu_ps(out + c, _mm256_add_ps(_mm256_loadu_ps(out + c), t));
    }
    for (; c < width; ++c) out[c] += term1_f16c<kAffine>(ar + c, gr + c, scale + c, shift + c);
  }
}

// r(act * grad) of sample row n (of C) at channel c, 8 channels / 1 channel.
template <bool kAffine, Reduce kReduce>
DFMU_F16C_TARGET inline __m256 sample_term8_f16c(const c10::Half* a, const c10::Half* g, int64_t n, int64_t C, int64_t c,
                                                 const float* sc, const float* sh) {
  return reduce8_f16c<kReduce>(term8_f16c<kAffine>(a + n * C + c, g + n * C + c, sc + c, sh + c));
}

template <bool kAffine, Reduce kReduce>
DFMU_F16C_TARGET inline float sample_term1_f16c(const c10::Half* a, const c10::Half* g, int64_t n, int64_t C, int64_t c,
                                                const float* sc, const float* sh) {
  return reduce1_f16c<kReduce>(term1_f16c<kAffine>(a + n * C + c, g + n * C + c, sc + c, sh + c));
}

// Channels [begin, end) of group_sum_elementwise for group row `ok` and the group's samples `ns`.
template <bool kAffine, Reduce kReduce>
DFMU_F16C_TARGET void elementwise_group_f16c(const c10::Half* a, const c10::Half* g, const int64_t* ns, int64_t count,
                                             int64_t C, int64_t begin, int64_t end, const float* sc, const float* sh,
                                             float* ok) {
  constexpr auto term8 = sample_term8_f16c<kAffine, kReduce>;
  constexpr auto term1 = sample_term1_f16c<kAffine, kReduce>;
  const int64_t vec_end = end - (end - begin) % 8;
  int64_t j = 0;
  for (; j + 4 <= count; j += 4) {
    const int64_t n0 = ns[j], n1 = ns[j + 1], n2 = ns[j + 2], n3 = ns[j + 3];
    int64_t c = begin;
    for (; c < vec_end; c += 8) {
      const __m256 sum = _mm256_add_ps(_mm256_add_ps(term8(a, g, n0, C, c, sc, sh), term8(a, g, n1, C, c, sc, sh)),
                                       _mm256_add_ps(term8(a, g, n2, C, c, sc, sh), term8(a, g, n3, C, c, sc, sh)));
      _mm256_storeu_ps(ok + c, _mm256_add_ps(_mm256_loadu_ps(ok + c), sum));
    }
    for (; c < end; ++c) {
      ok[c] += (term1(a, g, n0, C, c, sc, sh) + term1(a, g, n1, C, c, sc, sh)) +
               (term1(a, g, n2, C, c, sc, sh) + term1(a, g, n3, C, c, sc, sh));
    }
  }
  for (; j < count; ++j) {
    const int64_t n = ns[j];
    int64_t c = begin;
    for (; c < vec_end; c += 8) {
      _mm256_storeu_ps(ok + c, _mm256_add_ps(_mm256_loadu_ps(ok + c), term8(a, g, n, C, c, sc, sh)));
    }
    for (; c < end; ++c) ok[c] += term1(a, g, n, C, c, sc, sh);
  }
}
#endif  // DFMU_F16C

// s[n, c] for the [N][C][R] layout: one contiguous run of R per (n, c).
template <bool kAffine, typename scalar_t, typename acc_t>
void dots_channels_outer(const scalar_t* a, const scalar_t* g, int64_t rows, int64_t C, int64_t R,
                         Affine<acc_t> affine, [[maybe_unused]] bool f16c, acc_t* s) {
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(R, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
#if DFMU_F16C
    if constexpr (std::is_same_v<scalar_t, c10::Half>) {
      if (f16c) return dots_channels_outer_f16c<kAffine>(a, g, begin, end, C, R, affine, s);
    }
#endif
    for (int64_t row = begin; row < end; ++row) {
      const int64_t c = row % C;
      s[row] = dot_run<kAffine>(a + row * R, g + row * R, R, affine.scale_of(c), affine.shift_of(c));
    }
  });
}

// s[n, c] for the [N][R][C] layout: accumulate whole channel rows, vectorised across channels.
template <bool kAffine, typename scalar_t, typename acc_t>
void dots_channels_inner(const scalar_t* a, const scalar_t* g, int64_t N, int64_t R, int64_t C,
                         Affine<acc_t> affine, bool f16c, acc_t* s) {
  // Channels per work item. The F16C kernel takes up to 1024 (a whole row of a transformer's
  // (N, T, C) output, read front to back; 256-channel tiles of a 768-wide row made it skip 2/3 of
  // every row and ran at half the speed). Tiles only split the channels: every sum is the same.
  constexpr int64_t kMaxTile = 1024;
  const int64_t tile = f16c ? kMaxTile : 256;
  const int64_t tiles = (C + tile - 1) / tile;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(R * std::min(C, tile), 1));
  at::parallel_for(0, N * tiles, grain, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / tiles;
      const int64_t c0 = (item % tiles) * tile;
      const int64_t width = std::min(tile, C - c0);
      acc_t* out = s + n * C + c0;
      std::fill(out, out + width, acc_t(0));
      acc_t scale[kMaxTile], shift[kMaxTile];
      for (int64_t c = 0; c < width; ++c) {
        scale[c] = affine.scale_of(c0 + c);
        shift[c] = affine.shift_of(c0 + c);
      }
#if DFMU_F16C
      if constexpr (std::is_same_v<scalar_t, c10::Half>) {
        if (f16c) {
          inner_tile_f16c<kAffine>(a + n * R * C + c0, g + n * R * C + c0, R, C, width, scale, shift, out);
          continue;
        }
      }
#endif
      auto term = [&](const scalar_t* ar, const scalar_t* gr, int64_t c) {
        return activation<kAffine>(ar[c], scale[c], shift[c]) * to_acc<acc_t>(gr[c]);
      };
      // Four positions per pass over the tile: one read-modify-write of `out` per four products
      // instead of one per product (the stores, not the loads, bounded this loop).
      int64_t r = 0;
      for (; r + 4 <= R; r += 4) {
        const scalar_t* a0 = a + (n * R + r) * C + c0;
        const scalar_t* g0 = g + (n * R + r) * C + c0;
        const scalar_t *a1 = a0 + C, *a2 = a1 + C, *a3 = a2 + C;
        const scalar_t *g1 = g0 + C, *g2 = g1 + C, *g3 = g2 + C;
        for (int64_t c = 0; c < width; ++c) {
          out[c] += (term(a0, g0, c) + term(a1, g1, c)) + (term(a2, g2, c) + term(a3, g3, c));
        }
      }
      for (; r < R; ++r) {
        const scalar_t* ar = a + (n * R + r) * C + c0;
        const scalar_t* gr = g + (n * R + r) * C + c0;
        for (int64_t c = 0; c < width; ++c) out[c] += term(ar, gr, c);
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

// Group of sample n, or -1 for an id outside [0, K) (only possible when the range check was
// skipped): such samples are ignored rather than written out of bounds.
inline int64_t group_of(const int64_t* groups, int64_t n, int64_t K) {
  if (!groups) return 0;
  const int64_t k = groups[n];
  return (k >= 0 && k < K) ? k : -1;
}

// out[k, c] = sum over the samples of group k, in index order, of r(s[n, c]).
template <typename acc_t>
void group_sum(const acc_t* s, const int64_t* groups, int64_t N, int64_t C, int64_t K, Reduce reduce, acc_t* out) {
  with_reduce<acc_t>(reduce, [&](auto r) {
    at::parallel_for(0, C, std::max<int64_t>(1, 4096 / std::max<int64_t>(N, 1)), [&](int64_t begin, int64_t end) {
      for (int64_t n = 0; n < N; ++n) {
        const int64_t k = group_of(groups, n, K);
        if (k < 0) continue;
        const acc_t* __restrict__ sn = s + n * C;
        acc_t* __restrict__ ok = out + k * C;
        for (int64_t c = begin; c < end; ++c) ok[c] += r(sn[c]);
      }
    });
  });
}

// R == 1 (linear outputs): s[n, c] = a[n, c] * g[n, c] needs no buffer; fold it straight into the
// group sums (a buffer as large as the input would cost more in page faults than the arithmetic).
// The samples in group order, stable (a counting sort): order[start[k] : start[k+1]] are group k's
// samples in index order; ids outside [0, K) are left out.
struct SampleSegments {
  std::vector<int64_t> order;
  std::vector<int64_t> start;
};

inline SampleSegments segment_samples(const int64_t* groups, int64_t N, int64_t K) {
  SampleSegments s;
  s.start.assign(K + 1, 0);
  for (int64_t n = 0; n < N; ++n) {
    const int64_t k = group_of(groups, n, K);
    if (k >= 0) ++s.start[k + 1];
  }
  for (int64_t k = 0; k < K; ++k) s.start[k + 1] += s.start[k];
  s.order.resize(s.start[K]);
  std::vector<int64_t> next(s.start.begin(), s.start.end() - 1);
  for (int64_t n = 0; n < N; ++n) {
    const int64_t k = group_of(groups, n, K);
    if (k >= 0) s.order[next[k]++] = n;
  }
  return s;
}

#if DFMU_F16C
// group_sum_elementwise for float16 on F16C: the same chunks of channels, groups and sample quads.
template <bool kAffine, Reduce kReduce>
void group_sum_elementwise_f16c(const c10::Half* a, const c10::Half* g, const SampleSegments& segments, int64_t N,
                                int64_t C, int64_t K, Affine<float> affine, float* out) {
  at::parallel_for(0, C, std::max<int64_t>(1, 4096 / std::max<int64_t>(N, 1)), [&](int64_t begin, int64_t end) {
    std::vector<float> scale(end - begin), shift(end - begin);
    for (int64_t c = begin; c < end; ++c) {
      scale[c - begin] = affine.scale_of(c);
      shift[c - begin] = affine.shift_of(c);
    }
    for (int64_t k = 0; k < K; ++k) {
      elementwise_group_f16c<kAffine, kReduce>(a, g, segments.order.data() + segments.start[k],
                                               segments.start[k + 1] - segments.start[k], C, begin, end,
                                               scale.data() - begin, shift.data() - begin, out + k * C);
    }
  });
}
#endif

template <bool kAffine, typename scalar_t, typename acc_t>
void group_sum_elementwise(const scalar_t* a, const scalar_t* g, const int64_t* groups, int64_t N, int64_t C,
                           int64_t K, Affine<acc_t> affine, Reduce reduce, [[maybe_unused]] bool f16c, acc_t* out) {
  const SampleSegments segments = segment_samples(groups, N, K);
#if DFMU_F16C
  if constexpr (std::is_same_v<scalar_t, c10::Half>) {
    if (f16c) {
      switch (reduce) {
        case Reduce::Abs: return group_sum_elementwise_f16c<kAffine, Reduce::Abs>(a, g, segments, N, C, K, affine, out);
        case Reduce::Square: return group_sum_elementwise_f16c<kAffine, Reduce::Square>(a, g, segments, N, C, K, affine, out);
        default: return group_sum_elementwise_f16c<kAffine, Reduce::Signed>(a, g, segments, N, C, K, affine, out);
      }
    }
  }
#endif
  with_reduce<acc_t>(reduce, [&](auto r) {
    at::parallel_for(0, C, std::max<int64_t>(1, 4096 / std::max<int64_t>(N, 1)), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> scale(end - begin), shift(end - begin);
      for (int64_t c = begin; c < end; ++c) {
        scale[c - begin] = affine.scale_of(c);
        shift[c - begin] = affine.shift_of(c);
      }
      const acc_t* __restrict__ sc = scale.data() - begin;
      const acc_t* __restrict__ sh = shift.data() - begin;
      auto term = [&](int64_t n, int64_t c) {
        return r(activation<kAffine>(a[n * C + c], sc[c], sh[c]) * to_acc<acc_t>(g[n * C + c]));
      };
      for (int64_t k = 0; k < K; ++k) {
        acc_t* __restrict__ ok = out + k * C;
        const int64_t* ns = segments.order.data() + segments.start[k];
        const int64_t count = segments.start[k + 1] - segments.start[k];
        int64_t j = 0;
        // Four samples of the group per pass: one read-modify-write of the group row per four terms.
        for (; j + 4 <= count; j += 4) {
          const int64_t n0 = ns[j], n1 = ns[j + 1], n2 = ns[j + 2], n3 = ns[j + 3];
          for (int64_t c = begin; c < end; ++c) {
            ok[c] += (term(n0, c) + term(n1, c)) + (term(n2, c) + term(n3, c));
          }
        }
        for (; j < count; ++j) {
          for (int64_t c = begin; c < end; ++c) ok[c] += term(ns[j], c);
        }
      }
    });
  });
}

at::Tensor block_importance_cpu(const at::Tensor& act, const at::Tensor& grad,
                                const std::optional<at::Tensor>& groups, int64_t num_groups,
                                int64_t channel_dim, c10::string_view reduce,
                                const std::optional<at::Tensor>& act_scale,
                                const std::optional<at::Tensor>& act_shift, bool check_range) {
  TORCH_CHECK_VALUE(act.device().is_cpu(), "block_importance: expected CPU tensors, got act on ", act.device());
  ImportanceProblem p = canonicalize(act, grad, channel_dim, std::string(reduce));
  check_groups(groups, p.N, num_groups, act, check_range);
  const at::Tensor scale = affine_param(act_scale, "act_scale", p.C, act, p.out_dtype);
  const at::Tensor shift = affine_param(act_shift, "act_shift", p.C, act, p.out_dtype);
  at::Tensor out = at::zeros({num_groups, p.C}, act.options().dtype(p.out_dtype));
  if (p.N == 0 || p.C == 0) return out;
  at::Tensor group_ids;
  if (groups.has_value()) group_ids = groups->to(at::kLong).contiguous();
  const int64_t* ids = group_ids.defined() ? group_ids.const_data_ptr<int64_t>() : nullptr;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.act.scalar_type(), "block_importance_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* a = p.act.const_data_ptr<scalar_t>();
    const scalar_t* g = p.grad.const_data_ptr<scalar_t>();
    Affine<acc_t> affine;
    if (scale.defined()) affine.scale = scale.const_data_ptr<acc_t>();
    if (shift.defined()) affine.shift = shift.const_data_ptr<acc_t>();
    acc_t* o = out.mutable_data_ptr<acc_t>();
    const bool f16c = std::is_same_v<scalar_t, c10::Half> && use_f16c();
    auto run = [&](auto affine_tag) {
      constexpr bool kAffine = decltype(affine_tag)::value;
      if (p.R == 1) {
        group_sum_elementwise<kAffine>(a, g, ids, p.N, p.C, num_groups, affine, p.reduce, f16c, o);
        return;
      }
      at::Tensor s = at::empty({p.N, p.C}, out.options());
      acc_t* sp = s.mutable_data_ptr<acc_t>();
      if (p.layout == Layout::kChannelsOuter) {
        dots_channels_outer<kAffine>(a, g, p.N * p.C, p.C, p.R, affine, f16c, sp);
      } else {
        dots_channels_inner<kAffine>(a, g, p.N, p.R, p.C, affine, f16c, sp);
      }
      group_sum<acc_t>(sp, ids, p.N, p.C, num_groups, p.reduce, o);
    };
    if (affine.any()) {
      run(std::true_type{});
    } else {
      run(std::false_type{});
    }
  });
  return out;
}

}  // namespace
}  // namespace dfmu

TORCH_LIBRARY_IMPL(dfmu_ext, CPU, m) { m.impl("block_importance", &dfmu::block_importance_cpu); }
