// Aligned vector loads/stores and accumulation types shared by the CUDA kernels.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <initializer_list>

namespace dfmu {

// fp32 accumulation for every type but fp64.
template <typename T> struct AccumulateType { using type = float; };
template <> struct AccumulateType<double> { using type = double; };
template <typename T> using acc_type_t = typename AccumulateType<T>::type;

// Explicit conversions: torch builds define __CUDA_NO_HALF_CONVERSIONS__, so no implicit casts.
__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_acc(acc_type_t<T> x);
template <> __device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <> __device__ __forceinline__ double from_acc<double>(double x) { return x; }
template <> __device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// V scalars moved by one 16-byte (or narrower) memory instruction.
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <typename T, int V>
__device__ __forceinline__ Pack<T, V> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, V>*>(p);
}

template <typename T, int V>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, V>& v) {
  *reinterpret_cast<Pack<T, V>*>(p) = v;
}

// Widest V (elements per 16 bytes) usable for every pointer in `ptrs` and every run length `len`.
template <typename T>
inline int pack_width(std::initializer_list<const void*> ptrs, std::initializer_list<int64_t> lens) {
  int v = 16 / int(sizeof(T));
  if (v < 1) v = 1;
  while (v > 1) {
    bool ok = true;
    for (const void* p : ptrs) ok = ok && (reinterpret_cast<uintptr_t>(p) % (uintptr_t(v) * sizeof(T)) == 0);
    for (int64_t l : lens) ok = ok && (l % v == 0);
    if (ok) break;
    v /= 2;
  }
  return v;
}

}  // namespace dfmu
