#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <type_traits>

#include "launchers.h"

namespace mtlfast {
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half(x);
}
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16(x);
}

// 16-byte vectors of an element type: kLanes elements travel as one uint4.
template <typename T> struct Vec {
  static constexpr int kLanes = 16 / static_cast<int>(sizeof(T));
  // Raw element bits: zero bits are +0.0 for all three types, so padding is a plain 0.
  using Bits = std::conditional_t<sizeof(T) == 4, uint32_t, uint16_t>;
};

// True when every row of a (rows, *) matrix at p with row stride ld starts on 16 bytes.
inline bool rows_aligned16(const void* p, int64_t ld, int elem_size) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0 && (ld * elem_size) % 16 == 0;
}

// kLanes elements starting at p (16-byte aligned, all in bounds), streamed past L1.
template <typename T> __device__ __forceinline__ uint4 load_vec(const T* p) {
  return __ldcs(reinterpret_cast<const uint4*>(p));
}

// The same vector from any address: lanes at or past `valid` are zero.
template <typename T> __device__ __forceinline__ uint4 load_vec_scalar(const T* p, int64_t valid) {
  using Bits = typename Vec<T>::Bits;
  union { uint4 v; Bits b[Vec<T>::kLanes]; } u;
  u.v = make_uint4(0u, 0u, 0u, 0u);
  const Bits* src = reinterpret_cast<const Bits*>(p);
#pragma unroll
  for (int k = 0; k < Vec<T>::kLanes; ++k)
    if (k < valid) u.b[k] = __ldg(src + k);
  return u.v;
}

// Lane k of a raw vector as float.
template <typename T> __device__ __forceinline__ void unpack(const uint4& v, float* f) {
  if constexpr (sizeof(T) == 4) {
    f[0] = __uint_as_float(v.x); f[1] = __uint_as_float(v.y);
    f[2] = __uint_as_float(v.z); f[3] = __uint_as_float(v.w);
  } else {
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      union { uint32_t u; T h[2]; } pair;
      pair.u = w[k];
      f[2 * k] = to_float(pair.h[0]);
      f[2 * k + 1] = to_float(pair.h[1]);
    }
  }
}

template <typename T> __device__ __forceinline__ uint4 pack(const float* f) {
  union { uint4 v; T e[Vec<T>::kLanes]; } u;
#pragma unroll
  for (int k = 0; k < Vec<T>::kLanes; ++k) u.e[k] = from_float<T>(f[k]);
  return u.v;
}

// Number of SMs and resident blocks per SM of `kernel` at `threads` per block, for one wave.
template <typename K> inline int one_wave_blocks(K kernel, int threads, size_t smem = 0) {
  int dev = 0, sms = 0, per_sm = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) return 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem) !=
      cudaSuccess)
    return 0;
  return sms * (per_sm < 1 ? 1 : per_sm);
}
}  // namespace mtlfast

// Run `body` with scalar_t bound to the element type named by a MTLFAST_* code.
#define MTLFAST_DISPATCH_DTYPE(code, ...)                         \
  switch (code) {                                                 \
    case MTLFAST_F32: { using scalar_t = float; __VA_ARGS__; break; } \
    case MTLFAST_F16: { using scalar_t = __half; __VA_ARGS__; break; } \
    case MTLFAST_BF16: { using scalar_t = __nv_bfloat16; __VA_ARGS__; break; } \
    default: return static_cast<int>(cudaErrorInvalidValue);     \
  }
