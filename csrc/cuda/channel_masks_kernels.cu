// CUDA kernel of apply_channel_masks_ (host side: channel_masks_cuda.cpp), in the manner of a
// multi-tensor apply: the pointers of up to kMaxTensors tensors and a block -> (tensor, chunk)
// table travel as one kernel argument, so a whole model's parameter list is masked in one launch
// (or a handful) instead of one per tensor. Units whose mask is exactly 1 are not touched.
#include <cuda_runtime.h>

#include <stdexcept>
#include <vector>

#include "launch.h"
#include "vector_access.cuh"

namespace dfmu {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kChunkElems = 16384;  // elements per block; a multiple of every pack width

// The whole (tensor, chunk) table travels as one kernel argument. CUDA 12.1+ allows 32 KiB of
// kernel parameters on Volta and newer (older toolkits: 4 KiB), enough for a ResNet-50's 161
// parameters (~1600 chunks) in one launch.
#if defined(CUDART_VERSION) && CUDART_VERSION >= 12010
constexpr int kMaxTensors = 192;
constexpr int kMaxBlocks = 4096;
constexpr size_t kParamLimit = 32764;
#else
constexpr int kMaxTensors = 48;
constexpr int kMaxBlocks = 320;
constexpr size_t kParamLimit = 4096;
#endif

struct MaskBatch {
  void* data[kMaxTensors];
  const void* mask[kMaxTensors];
  int64_t numel[kMaxTensors];
  int64_t inner[kMaxTensors];
  int32_t block_chunk[kMaxBlocks];
  uint8_t block_tensor[kMaxBlocks];
};
static_assert(sizeof(MaskBatch) <= kParamLimit, "the multi-tensor table must fit the kernel-parameter limit");
static_assert(kMaxTensors <= 256, "block_tensor is a uint8_t");

// The masks of the V elements starting at i (units are runs of `inner` elements; a pack straddles
// a unit boundary only when inner < V). Returns whether they are all exactly 1: such a pack is
// left alone (x * 1 == x), so kept units cost no memory traffic at all.
template <typename mask_t, int V>
__device__ __forceinline__ bool pack_masks(const mask_t* __restrict__ mask, int64_t i, int64_t inner, mask_t (&m)[V]) {
  int64_t unit = i / inner;
  int64_t unit_end = (unit + 1) * inner;
  mask_t mu = mask[unit];
  bool all_one = true;
#pragma unroll
  for (int j = 0; j < V; ++j) {
    if (i + j >= unit_end) {
      unit = (i + j) / inner;
      unit_end = (unit + 1) * inner;
      mu = mask[unit];
    }
    m[j] = mu;
    all_one = all_one && mu == mask_t(1);
  }
  return all_one;
}

template <typename scalar_t, int V>
__device__ __forceinline__ void scale_pack(scalar_t* p, const acc_type_t<scalar_t> (&m)[V]) {
  Pack<scalar_t, V> x = load_pack<scalar_t, V>(p);
#pragma unroll
  for (int j = 0; j < V; ++j) x.v[j] = from_acc<scalar_t>(to_acc(x.v[j]) * m[j]);
  store_pack<scalar_t, V>(p, x);
}

template <typename scalar_t, int V>
__global__ void __launch_bounds__(kThreads) masked_scale_kernel(MaskBatch batch) {
  using mask_t = acc_type_t<scalar_t>;
  const int t = batch.block_tensor[blockIdx.x];
  scalar_t* data = static_cast<scalar_t*>(batch.data[t]);
  const mask_t* mask = static_cast<const mask_t*>(batch.mask[t]);
  const int64_t numel = batch.numel[t];
  const int64_t inner = batch.inner[t];
  const int64_t begin = int64_t(batch.block_chunk[blockIdx.x]) * kChunkElems;
  const int64_t end = min(numel, begin + kChunkElems);
  const bool aligned = V > 1 && reinterpret_cast<uintptr_t>(data) % (sizeof(scalar_t) * V) == 0;
  int64_t tail = begin;
  if (aligned) {
    const int64_t full_end = begin + (end - begin) / V * V;
    constexpr int64_t kStride = int64_t(kThreads) * V;
    int64_t i = begin + int64_t(threadIdx.x) * V;
    // Two packs per iteration: both loads are issued before either store.
    for (; i + kStride < full_end; i += 2 * kStride) {
      mask_t m0[V], m1[V];
      const bool skip0 = pack_masks(mask, i, inner, m0);
      const bool skip1 = pack_masks(mask, i + kStride, inner, m1);
      Pack<scalar_t, V> x0, x1;
      if (!skip0) x0 = load_pack<scalar_t, V>(data + i);
      if (!skip1) x1 = load_pack<scalar_t, V>(data + i + kStride);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        x0.v[j] = from_acc<scalar_t>(to_acc(x0.v[j]) * m0[j]);
        x1.v[j] = from_acc<scalar_t>(to_acc(x1.v[j]) * m1[j]);
      }
      if (!skip0) store_pack<scalar_t, V>(data + i, x0);
      if (!skip1) store_pack<scalar_t, V>(data + i + kStride, x1);
    }
    for (; i < full_end; i += kStride) {
      mask_t m[V];
      if (!pack_masks(mask, i, inner, m)) scale_pack<scalar_t, V>(data + i, m);
    }
    tail = full_end;
  }
  for (int64_t i = tail + threadIdx.x; i < end; i += kThreads) {
    const mask_t m = mask[i / inner];
    if (m != mask_t(1)) data[i] = from_acc<scalar_t>(to_acc(data[i]) * m);
  }
}

template <typename scalar_t>
void launch_masked_scale_typed(const std::vector<MaskedTensor>& tensors, cudaStream_t stream) {
  constexpr int kPack = 16 / int(sizeof(scalar_t));
  MaskBatch batch;
  int n_tensors = 0, n_blocks = 0;
  auto flush = [&] {
    if (n_blocks > 0) {
      masked_scale_kernel<scalar_t, kPack><<<n_blocks, kThreads, 0, stream>>>(batch);
      check_launch("apply_channel_masks_");
    }
    n_tensors = 0;
    n_blocks = 0;
  };
  for (size_t i = 0; i < tensors.size(); ++i) {
    const MaskedTensor& t = tensors[i];
    const int64_t numel = t.numel;
    const int64_t chunks = (numel + kChunkElems - 1) / kChunkElems;
    if (chunks >= (int64_t(1) << 31)) throw std::runtime_error("apply_channel_masks_: tensor too large");
    if (n_tensors == kMaxTensors) flush();
    batch.data[n_tensors] = t.data;
    batch.mask[n_tensors] = t.mask;
    batch.numel[n_tensors] = numel;
    batch.inner[n_tensors] = t.inner;
    for (int64_t c = 0; c < chunks; ++c) {
      batch.block_tensor[n_blocks] = uint8_t(n_tensors);
      batch.block_chunk[n_blocks] = int32_t(c);
      ++n_blocks;
      if (n_blocks == kMaxBlocks) {
        // The table is full: launch it, keep the current tensor as slot 0 of the next batch.
        const int current = n_tensors;
        masked_scale_kernel<scalar_t, kPack><<<n_blocks, kThreads, 0, stream>>>(batch);
        check_launch("apply_channel_masks_");
        n_blocks = 0;
        batch.data[0] = batch.data[current];
        batch.mask[0] = batch.mask[current];
        batch.numel[0] = batch.numel[current];
        batch.inner[0] = batch.inner[current];
        n_tensors = 0;
      }
    }
    ++n_tensors;
  }
  flush();
}

}  // namespace

void launch_masked_scale(DType dtype, const std::vector<MaskedTensor>& tensors, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat: return launch_masked_scale_typed<float>(tensors, stream);
    case DType::kDouble: return launch_masked_scale_typed<double>(tensors, stream);
    case DType::kHalf: return launch_masked_scale_typed<__half>(tensors, stream);
    default: return launch_masked_scale_typed<__nv_bfloat16>(tensors, stream);
  }
}

}  // namespace cuda
}  // namespace dfmu
