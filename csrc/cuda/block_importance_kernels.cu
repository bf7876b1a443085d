// CUDA kernels of block_importance (host side: block_importance_cuda.cpp).
//
// Stage 1 reads act and grad exactly once with 16-byte loads and writes partial dot products
//   partial[split][n][c] = sum over one fixed chunk `split` of the positions of act * grad.
// Stage 2 folds the splits, applies r(.) and sums each group's samples in a fixed order:
//   out[k][c] = sum_{j in segment k} r( sum_split partial[split][perm[j]][c] ).
// Every sum has a fixed shape (shuffle butterflies, fixed shared-memory order, no float atomics),
// so equal inputs on the same device give bit-identical outputs.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>
#include <string>

#include "launch.h"
#include "vector_access.cuh"

namespace dfmu {
namespace cuda {
namespace {

constexpr int kThreads = 256;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// acc += sum_j (a_j * scale + shift) * g_j. With scale 1 and shift 0 (no affine given) this is
// exactly the plain dot: x * 1 + 0 == x; one extra FMA per element is free in a memory-bound loop.
template <typename acc_t, typename scalar_t, int V>
__device__ __forceinline__ void fma_pack(acc_t& acc, const Pack<scalar_t, V>& a, const Pack<scalar_t, V>& g,
                                         acc_t scale, acc_t shift) {
#pragma unroll
  for (int j = 0; j < V; ++j) acc += (to_acc(a.v[j]) * scale + shift) * to_acc(g.v[j]);
}

template <typename acc_t>
__device__ __forceinline__ acc_t scale_at(const acc_t* scale, int64_t c) { return scale ? scale[c] : acc_t(1); }
template <typename acc_t>
__device__ __forceinline__ acc_t shift_at(const acc_t* shift, int64_t c) { return shift ? shift[c] : acc_t(0); }

// [N][C][R] layout: `lanes` threads (a power of two <= 32) own one (row, split) item and stream
// its chunk with four packs of act and grad in flight, then combine with an xor butterfly.
template <typename scalar_t, int V>
__global__ void __launch_bounds__(kThreads) channels_outer_dots_kernel(
    const scalar_t* __restrict__ act, const scalar_t* __restrict__ grad, int64_t rows, int64_t C, int64_t R,
    int64_t chunk, int64_t items, int lanes, int64_t iterations, const acc_type_t<scalar_t>* __restrict__ scale,
    const acc_type_t<scalar_t>* __restrict__ shift, acc_type_t<scalar_t>* __restrict__ partial) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t team = tid / lanes;
  const int lane = int(tid % lanes);
  const int64_t teams = int64_t(gridDim.x) * blockDim.x / lanes;
  for (int64_t it = 0; it < iterations; ++it) {  // uniform trip count: every lane reaches the shuffles
    const int64_t item = team + it * teams;
    acc_t acc = 0;
    if (item < items) {
      const int64_t split = item / rows;
      const int64_t row = item - split * rows;
      const int64_t begin = split * chunk;
      const int64_t end = min(R, begin + chunk);
      const scalar_t* a = act + row * R;
      const scalar_t* g = grad + row * R;
      const acc_t s = scale_at(scale, row % C), t = shift_at(shift, row % C);
      acc_t acc1 = 0, acc2 = 0, acc3 = 0;
      int64_t i = begin + int64_t(lane) * V;
      const int64_t stride = int64_t(lanes) * V;
      for (; i + 3 * stride < end; i += 4 * stride) {
        const auto a0 = load_pack<scalar_t, V>(a + i), g0 = load_pack<scalar_t, V>(g + i);
        const auto a1 = load_pack<scalar_t, V>(a + i + stride), g1 = load_pack<scalar_t, V>(g + i + stride);
        const auto a2 = load_pack<scalar_t, V>(a + i + 2 * stride), g2 = load_pack<scalar_t, V>(g + i + 2 * stride);
        const auto a3 = load_pack<scalar_t, V>(a + i + 3 * stride), g3 = load_pack<scalar_t, V>(g + i + 3 * stride);
        fma_pack(acc, a0, g0, s, t);
        fma_pack(acc1, a1, g1, s, t);
        fma_pack(acc2, a2, g2, s, t);
        fma_pack(acc3, a3, g3, s, t);
      }
      for (; i < end; i += stride) fma_pack(acc, load_pack<scalar_t, V>(a + i), load_pack<scalar_t, V>(g + i), s, t);
      acc += (acc1 + acc2) + acc3;
    }
    for (int offset = lanes / 2; offset > 0; offset /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, offset, lanes);
    if (item < items && lane == 0) partial[item] = acc;  // item == split * rows + row
  }
}

// [N][R][C] layout: a block owns (channel tile, sample, split). Threads are (r_lane, channel pack);
// each streams every r_lanes-th position of its split, then r_lane 0 adds the r_lanes partials
// from shared memory in order.
template <typename scalar_t, int V>
__global__ void __launch_bounds__(kThreads) channels_inner_dots_kernel(
    const scalar_t* __restrict__ act, const scalar_t* __restrict__ grad, int64_t N, int64_t R, int64_t C,
    int64_t r_chunk, int64_t splits, int packs_per_tile, int64_t tiles, const acc_type_t<scalar_t>* __restrict__ scale,
    const acc_type_t<scalar_t>* __restrict__ shift, acc_type_t<scalar_t>* __restrict__ partial) {
  using acc_t = acc_type_t<scalar_t>;
  extern __shared__ unsigned char smem_raw[];
  acc_t* smem = reinterpret_cast<acc_t*>(smem_raw);
  const int64_t block = blockIdx.x;
  const int64_t tile = block % tiles;
  const int64_t n = (block / tiles) % N;
  const int64_t split = block / (tiles * N);
  const int r_lanes = kThreads / packs_per_tile;
  const int pack = threadIdx.x % packs_per_tile;
  const int r_lane = threadIdx.x / packs_per_tile;
  const int64_t c0 = (tile * packs_per_tile + pack) * V;
  const bool active = r_lane < r_lanes && c0 < C;
  acc_t acc[V], s[V], t[V];
#pragma unroll
  for (int j = 0; j < V; ++j) {
    acc[j] = 0;
    s[j] = active ? scale_at(scale, c0 + j) : acc_t(1);  // C % V == 0 whenever V > 1
    t[j] = active ? shift_at(shift, c0 + j) : acc_t(0);
  }
  if (active) {
    const int64_t r_begin = split * r_chunk;
    const int64_t r_end = min(R, r_begin + r_chunk);
    const scalar_t* a = act + n * R * C + c0;
    const scalar_t* g = grad + n * R * C + c0;
    int64_t r = r_begin + r_lane;
    for (; r + 1 * r_lanes < r_end; r += 2 * r_lanes) {
      const auto a0 = load_pack<scalar_t, V>(a + r * C), g0 = load_pack<scalar_t, V>(g + r * C);
      const auto a1 = load_pack<scalar_t, V>(a + (r + r_lanes) * C), g1 = load_pack<scalar_t, V>(g + (r + r_lanes) * C);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        acc[j] += (to_acc(a0.v[j]) * s[j] + t[j]) * to_acc(g0.v[j]);
        acc[j] += (to_acc(a1.v[j]) * s[j] + t[j]) * to_acc(g1.v[j]);
      }
    }
    for (; r < r_end; r += r_lanes) {
      const auto a0 = load_pack<scalar_t, V>(a + r * C), g0 = load_pack<scalar_t, V>(g + r * C);
#pragma unroll
      for (int j = 0; j < V; ++j) acc[j] += (to_acc(a0.v[j]) * s[j] + t[j]) * to_acc(g0.v[j]);
    }
  }
  if (r_lane < r_lanes) {
#pragma unroll
    for (int j = 0; j < V; ++j) smem[(r_lane * packs_per_tile + pack) * V + j] = acc[j];
  }
  __syncthreads();
  if (r_lane == 0 && c0 < C) {
    acc_t* out = partial + (split * N + n) * C + c0;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      acc_t total = 0;
      for (int l = 0; l < r_lanes; ++l) total += smem[(l * packs_per_tile + pack) * V + j];
      out[j] = total;
    }
  }
}

// R == 1 (linear layers): partial[n][c] = act[n][c] * grad[n][c], elementwise.
template <typename scalar_t, int V>
__global__ void __launch_bounds__(kThreads) elementwise_dots_kernel(
    const scalar_t* __restrict__ act, const scalar_t* __restrict__ grad, int64_t packs, int64_t C,
    const acc_type_t<scalar_t>* __restrict__ scale, const acc_type_t<scalar_t>* __restrict__ shift,
    acc_type_t<scalar_t>* __restrict__ partial) {
  using acc_t = acc_type_t<scalar_t>;
  const bool affine = scale != nullptr || shift != nullptr;
  for (int64_t p = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; p < packs; p += int64_t(gridDim.x) * blockDim.x) {
    const auto a = load_pack<scalar_t, V>(act + p * V), g = load_pack<scalar_t, V>(grad + p * V);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      acc_t x = to_acc(a.v[j]);
      if (affine) {
        const int64_t c = (p * V + j) % C;
        x = x * scale_at(scale, c) + shift_at(shift, c);
      }
      partial[p * V + j] = x * to_acc(g.v[j]);
    }
  }
}

template <typename acc_t>
__device__ __forceinline__ acc_t apply_reduce(acc_t s, int mode) {
  return mode == 0 ? (s < 0 ? -s : s) : (mode == 1 ? s * s : s);
}

// Stage 2. Block (32 channels) x (8 sample lanes); grid.y walks the groups.
constexpr int kGroupTileC = 32;
constexpr int kGroupLanes = 8;

template <typename acc_t>
__global__ void group_reduce_kernel(const acc_t* __restrict__ partial, int64_t splits, int64_t N, int64_t C,
                                    const int64_t* __restrict__ perm, const int64_t* __restrict__ offsets,
                                    int64_t K, int mode, acc_t* __restrict__ out) {
  __shared__ acc_t smem[kGroupLanes][kGroupTileC];
  const int64_t c = int64_t(blockIdx.x) * kGroupTileC + threadIdx.x;
  for (int64_t k = blockIdx.y; k < K; k += gridDim.y) {
    acc_t acc = 0;
    if (c < C) {
      const int64_t begin = offsets[k], end = offsets[k + 1];
      for (int64_t j = begin + threadIdx.y; j < end; j += kGroupLanes) {
        const int64_t n = perm ? perm[j] : j;
        acc_t s = 0;
        for (int64_t sp = 0; sp < splits; ++sp) s += partial[(sp * N + n) * C + c];
        acc += apply_reduce(s, mode);
      }
    }
    smem[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && c < C) {
      acc_t total = 0;
#pragma unroll
      for (int l = 0; l < kGroupLanes; ++l) total += smem[l][threadIdx.x];
      out[k * C + c] = total;
    }
    __syncthreads();
  }
}


// Stage 2 without sorting, for few groups: block (32 channels) x (8 sample lanes) over one fixed
// run of samples (blockIdx.y); each lane adds r(s) of its samples (n = begin + lane, + 8, ...) into
// its own shared row per group, then lane l folds groups l, l + 8, ... over the 8 lanes in order and
// writes dst[chunk][k][c]. Fixed order everywhere, so deterministic.
template <typename acc_t>
__global__ void group_reduce_direct_kernel(const acc_t* __restrict__ partial, int64_t splits, int64_t N, int64_t C,
                                           const int64_t* __restrict__ groups, int64_t K, int mode, int64_t run,
                                           acc_t* __restrict__ dst) {
  extern __shared__ unsigned char smem_raw[];
  acc_t* acc = reinterpret_cast<acc_t*>(smem_raw);  // [kGroupLanes][K][kGroupTileC]
  const int tx = threadIdx.x, ty = threadIdx.y;
  for (int64_t k = 0; k < K; ++k) acc[(ty * K + k) * kGroupTileC + tx] = 0;
  const int64_t c = int64_t(blockIdx.x) * kGroupTileC + tx;
  const int64_t begin = int64_t(blockIdx.y) * run;
  const int64_t end = min(N, begin + run);
  if (c < C) {
    for (int64_t n = begin + ty; n < end; n += kGroupLanes) {
      const int64_t k = groups ? groups[n] : 0;
      if (k < 0 || k >= K) continue;  // possible only when the caller skipped the range check
      acc_t s = 0;
      for (int64_t sp = 0; sp < splits; ++sp) s += partial[(sp * N + n) * C + c];
      acc[(ty * K + k) * kGroupTileC + tx] += apply_reduce(s, mode);
    }
  }
  __syncthreads();
  if (c < C) {
    acc_t* out = dst + int64_t(blockIdx.y) * K * C;
    for (int64_t k = ty; k < K; k += kGroupLanes) {
      acc_t total = 0;
#pragma unroll
      for (int l = 0; l < kGroupLanes; ++l) total += acc[(l * K + k) * kGroupTileC + tx];
      out[k * C + c] = total;
    }
  }
}

// out[i] = sum over chunks, in order, of workspace[chunk][i].
template <typename acc_t>
__global__ void fold_chunks_kernel(const acc_t* __restrict__ workspace, int64_t chunks, int64_t size,
                                   acc_t* __restrict__ out) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < size; i += int64_t(gridDim.x) * blockDim.x) {
    acc_t total = 0;
    for (int64_t ch = 0; ch < chunks; ++ch) total += workspace[ch * size + i];
    out[i] = total;
  }
}

inline int floor_pow2(int64_t x) {
  int p = 1;
  while (int64_t(p) * 2 <= x && p < 32) p *= 2;
  return p;
}

// The launch geometry of stage 1, computed identically by importance_splits and the launch.
struct DotsGeometry {
  int64_t splits = 1;
  int64_t chunk = 0;  // positions per split
  int lanes = 1;      // channels_outer: threads per (row, split) item
  int packs_per_tile = 1;
  int64_t tiles = 1;  // channels_inner: channel tiles
};

template <typename scalar_t>
int pack_for(const DotsProblem& p) {
  const int64_t run = p.R == 1 ? p.N * p.C : (p.channels_outer ? p.R : p.C);
  const int v = pack_width<scalar_t>({p.act, p.grad}, {run});
  constexpr int kPack = 16 / int(sizeof(scalar_t));
  return v == kPack ? kPack : 1;  // two instantiations per dtype keep the build short
}

DotsGeometry plan(const DotsProblem& p, int V, int sms) {
  DotsGeometry geo;
  const int64_t resident_threads = int64_t(sms) * 2048;
  if (p.R == 1) return geo;
  if (p.channels_outer) {
    geo.lanes = floor_pow2(ceil_div(p.R, V));
    // Split long rows so that enough teams exist to fill the GPU; each lane keeps >= 4 packs.
    int64_t splits = std::max<int64_t>(1, ceil_div(resident_threads, p.N * p.C * geo.lanes));
    splits = std::min(splits, std::max<int64_t>(1, p.R / (int64_t(geo.lanes) * V * 4)));
    geo.chunk = ceil_div(ceil_div(p.R, splits), V) * V;
    geo.splits = ceil_div(p.R, geo.chunk);
    return geo;
  }
  const int64_t packs_total = ceil_div(p.C, V);
  geo.packs_per_tile = int(std::min<int64_t>(packs_total, kThreads));
  geo.tiles = ceil_div(packs_total, geo.packs_per_tile);
  const int r_lanes = kThreads / geo.packs_per_tile;
  int64_t splits = std::max<int64_t>(1, ceil_div(int64_t(sms) * 8, geo.tiles * p.N));
  splits = std::min(splits, std::max<int64_t>(1, p.R / (int64_t(r_lanes) * 4)));
  geo.chunk = ceil_div(p.R, splits);
  geo.splits = ceil_div(p.R, geo.chunk);
  return geo;
}

template <typename scalar_t, int V>
void launch_dots(const DotsProblem& p, const DotsGeometry& geo, int sms, void* partial_raw, cudaStream_t stream) {
  using acc_t = acc_type_t<scalar_t>;
  const scalar_t* a = static_cast<const scalar_t*>(p.act);
  const scalar_t* g = static_cast<const scalar_t*>(p.grad);
  acc_t* partial = static_cast<acc_t*>(partial_raw);
  const acc_t* scale = static_cast<const acc_t*>(p.scale);
  const acc_t* shift = static_cast<const acc_t*>(p.shift);
  if (p.R == 1) {
    const int64_t packs = p.N * p.C / V;
    const int64_t blocks = std::max<int64_t>(1, std::min(ceil_div(packs, kThreads), int64_t(sms) * 16));
    elementwise_dots_kernel<scalar_t, V><<<blocks, kThreads, 0, stream>>>(a, g, packs, p.C, scale, shift, partial);
  } else if (p.channels_outer) {
    const int64_t rows = p.N * p.C;
    const int64_t items = rows * geo.splits;
    const int64_t blocks = std::max<int64_t>(1, std::min(ceil_div(items * geo.lanes, kThreads), int64_t(sms) * 32));
    const int64_t teams = blocks * kThreads / geo.lanes;
    channels_outer_dots_kernel<scalar_t, V><<<blocks, kThreads, 0, stream>>>(
        a, g, rows, p.C, p.R, geo.chunk, items, geo.lanes, ceil_div(items, teams), scale, shift, partial);
  } else {
    const int64_t blocks = geo.tiles * p.N * geo.splits;
    if (blocks >= (int64_t(1) << 31)) throw std::runtime_error("block_importance: problem too large for one launch");
    const size_t smem = size_t(kThreads) * V * sizeof(acc_t);
    channels_inner_dots_kernel<scalar_t, V><<<blocks, kThreads, smem, stream>>>(
        a, g, p.N, p.R, p.C, geo.chunk, geo.splits, geo.packs_per_tile, geo.tiles, scale, shift, partial);
  }
  check_launch("block_importance stage 1");
}

template <typename scalar_t>
void dispatch_dots(const DotsProblem& p, int sms, int64_t splits, void* partial, cudaStream_t stream) {
  constexpr int kPack = 16 / int(sizeof(scalar_t));
  const int V = pack_for<scalar_t>(p);
  const DotsGeometry geo = plan(p, V, sms);
  if (geo.splits != splits) throw std::logic_error("block_importance: split count changed between plan and launch");
  if (V == kPack) {
    launch_dots<scalar_t, kPack>(p, geo, sms, partial, stream);
  } else {
    launch_dots<scalar_t, 1>(p, geo, sms, partial, stream);
  }
}

template <typename scalar_t>
int64_t splits_for(const DotsProblem& p, int sms) {
  return plan(p, pack_for<scalar_t>(p), sms).splits;
}

}  // namespace

void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": CUDA error: " + cudaGetErrorString(err));
}

int64_t importance_splits(const DotsProblem& p, int sms) {
  switch (p.dtype) {
    case DType::kFloat: return splits_for<float>(p, sms);
    case DType::kDouble: return splits_for<double>(p, sms);
    case DType::kHalf: return splits_for<__half>(p, sms);
    default: return splits_for<__nv_bfloat16>(p, sms);
  }
}

void launch_importance_dots(const DotsProblem& p, int sms, int64_t splits, void* partial, cudaStream_t stream) {
  switch (p.dtype) {
    case DType::kFloat: return dispatch_dots<float>(p, sms, splits, partial, stream);
    case DType::kDouble: return dispatch_dots<double>(p, sms, splits, partial, stream);
    case DType::kHalf: return dispatch_dots<__half>(p, sms, splits, partial, stream);
    default: return dispatch_dots<__nv_bfloat16>(p, sms, splits, partial, stream);
  }
}

void launch_group_reduce(bool is_double, const void* partial, int64_t splits, int64_t N, int64_t C,
                         const int64_t* perm, const int64_t* offsets, int64_t K, int mode, void* out,
                         cudaStream_t stream) {
  const dim3 block(kGroupTileC, kGroupLanes);
  const dim3 grid(unsigned(ceil_div(C, kGroupTileC)), unsigned(std::min<int64_t>(K, 65535)));
  if (is_double) {
    group_reduce_kernel<double><<<grid, block, 0, stream>>>(static_cast<const double*>(partial), splits, N, C, perm,
                                                            offsets, K, mode, static_cast<double*>(out));
  } else {
    group_reduce_kernel<float><<<grid, block, 0, stream>>>(static_cast<const float*>(partial), splits, N, C, perm,
                                                           offsets, K, mode, static_cast<float*>(out));
  }
  check_launch("block_importance stage 2");
}

int64_t group_reduce_direct_chunks(int64_t N, int64_t C, int sms) {
  const int64_t tiles = ceil_div(C, kGroupTileC);
  const int64_t want = ceil_div(int64_t(sms) * 4, tiles);       // about four blocks per SM
  return std::max<int64_t>(1, std::min(want, ceil_div(N, 64)));  // and >= 64 samples per run
}

template <typename acc_t>
void direct_typed(const acc_t* partial, int64_t splits, int64_t N, int64_t C, const int64_t* groups, int64_t K,
                  int mode, int64_t chunks, acc_t* workspace, acc_t* out, cudaStream_t stream) {
  const dim3 block(kGroupTileC, kGroupLanes);
  const dim3 grid(unsigned(ceil_div(C, kGroupTileC)), unsigned(chunks));
  const size_t smem = size_t(kGroupLanes) * size_t(K) * kGroupTileC * sizeof(acc_t);
  const int64_t run = ceil_div(N, chunks);
  group_reduce_direct_kernel<acc_t><<<grid, block, smem, stream>>>(partial, splits, N, C, groups, K, mode, run,
                                                                   chunks > 1 ? workspace : out);
  check_launch("block_importance stage 2");
  if (chunks > 1) {
    const int64_t size = K * C;
    const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(ceil_div(size, kThreads), 1024));
    fold_chunks_kernel<acc_t><<<blocks, kThreads, 0, stream>>>(workspace, chunks, size, out);
    check_launch("block_importance stage 2 fold");
  }
}

void launch_group_reduce_direct(bool is_double, const void* partial, int64_t splits, int64_t N, int64_t C,
                                const int64_t* groups, int64_t K, int mode, int64_t chunks, void* workspace,
                                void* out, cudaStream_t stream) {
  if (is_double) {
    direct_typed<double>(static_cast<const double*>(partial), splits, N, C, groups, K, mode, chunks,
                         static_cast<double*>(workspace), static_cast<double*>(out), stream);
  } else {
    direct_typed<float>(static_cast<const float*>(partial), splits, N, C, groups, K, mode, chunks,
                        static_cast<float*>(workspace), static_cast<float*>(out), stream);
  }
}

}  // namespace cuda
}  // namespace dfmu
