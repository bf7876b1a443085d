// CUDA kernel of apply_channel_masks_ (host side: channel_masks_cuda.cpp), in the manner of a
// multi-tensor apply: the pointers of up to kMaxTensors tensors and a block -> (tensor, chunk)
// table travel as one kernel argument, so a whole model's parameter list is masked in a handful
// of launches instead of one per tensor.
#include <cuda_runtime.h>

#include <stdexcept>
#include <vector>

#include "launch.h"
#include "vector_access.cuh"

namespace dfmu {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxTensors = 48;
constexpr int kMaxBlocks = 320;
constexpr int64_t kChunkElems = 16384;  // elements per block; a multiple of every pack width

// Must stay under the 4 KiB kernel-argument limit of older drivers: 48*32 + 320*5 = 3136 bytes.
struct MaskBatch {
  void* data[kMaxTensors];
  const void* mask[kMaxTensors];
  int64_t numel[kMaxTensors];
  int64_t inner[kMaxTensors];
  int32_t block_chunk[kMaxBlocks];
  uint8_t block_tensor[kMaxBlocks];
};

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
  if (aligned) {
    const int64_t full_end = begin + (end - begin) / V * V;
    for (int64_t i = begin + int64_t(threadIdx.x) * V; i < full_end; i += int64_t(kThreads) * V) {
      Pack<scalar_t, V> x = load_pack<scalar_t, V>(data + i);
      // Units are runs of `inner` elements; a pack may straddle a unit boundary when inner < V.
      int64_t unit = i / inner;
      int64_t unit_end = (unit + 1) * inner;
      mask_t m = mask[unit];
#pragma unroll
      for (int j = 0; j < V; ++j) {
        if (i + j >= unit_end) {
          unit = (i + j) / inner;
          unit_end = (unit + 1) * inner;
          m = mask[unit];
        }
        x.v[j] = from_acc<scalar_t>(to_acc(x.v[j]) * m);
      }
      store_pack<scalar_t, V>(data + i, x);
    }
    for (int64_t i = full_end + threadIdx.x; i < end; i += kThreads) {
      data[i] = from_acc<scalar_t>(to_acc(data[i]) * mask[i / inner]);
    }
  } else {
    for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
      data[i] = from_acc<scalar_t>(to_acc(data[i]) * mask[i / inner]);
    }
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
