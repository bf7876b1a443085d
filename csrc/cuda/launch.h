// Plain-C++ interface between the ATen-facing host code (*_cuda.cpp, compiled once by the host
// compiler) and the kernels (*.cu, compiled by nvcc once per GPU architecture). Keeping torch's
// headers out of the .cu files keeps each architecture's front-end pass short.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <vector>

namespace dfmu {
namespace cuda {

enum class DType { kFloat, kDouble, kHalf, kBFloat16 };

// What block_importance's first stage needs: act and grad viewed as [N][C][R] (channels_outer)
// or [N][R][C], contiguous.
// The activation is act * scale[c] + shift[c]; scale/shift are (C,) arrays in the accumulation
// type, nullptr meaning 1 / 0.
struct DotsProblem {
  DType dtype;
  const void* act;
  const void* grad;
  int64_t N, C, R;
  bool channels_outer;
  const void* scale = nullptr;
  const void* shift = nullptr;
};

// How many R-splits stage 1 will write for `p` on a GPU with `sms` multiprocessors; the caller
// allocates partial[splits][N][C] in the accumulation type (float, double for kDouble).
int64_t importance_splits(const DotsProblem& p, int sms);

// Stage 1: partial[split][n][c] = sum over chunk `split` of the positions of act * grad.
void launch_importance_dots(const DotsProblem& p, int sms, int64_t splits, void* partial, cudaStream_t stream);

// Stage 2: out[k][c] = sum_{j in [offsets[k], offsets[k+1])} r(sum_split partial[split][perm[j]][c]),
// perm == nullptr meaning the identity. `mode` is block_importance's Reduce.
void launch_group_reduce(bool is_double, const void* partial, int64_t splits, int64_t N, int64_t C,
                         const int64_t* perm, const int64_t* offsets, int64_t K, int mode, void* out,
                         cudaStream_t stream);

// Stage 2 for few groups (K <= kMaxDirectGroups), no sorting: group ids read directly,
// groups == nullptr meaning every sample in group 0; ids outside [0, K) are skipped.
// The batch is cut into `chunks` fixed runs of samples so that long batches still fill the GPU;
// with chunks > 1 the caller passes a workspace of chunks * K * C accumulators.
constexpr int64_t kMaxDirectGroups = 32;
int64_t group_reduce_direct_chunks(int64_t N, int64_t C, int sms);
void launch_group_reduce_direct(bool is_double, const void* partial, int64_t splits, int64_t N, int64_t C,
                                const int64_t* groups, int64_t K, int mode, int64_t chunks, void* workspace,
                                void* out, cudaStream_t stream);

// One tensor of apply_channel_masks_: numel elements, units of `inner` contiguous elements, mask
// in float (double for kDouble tensors).
struct MaskedTensor {
  void* data;
  const void* mask;
  int64_t numel;
  int64_t inner;
};

// Scales every tensor of one dtype in as few multi-tensor launches as the argument space allows.
void launch_masked_scale(DType dtype, const std::vector<MaskedTensor>& tensors, cudaStream_t stream);

// The last CUDA error as an exception (called after each launch).
void check_launch(const char* what);

}  // namespace cuda
}  // namespace dfmu
