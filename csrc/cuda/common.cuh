#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

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
}  // namespace mtlfast

// Run `body` with scalar_t bound to the element type named by a MTLFAST_* code.
#define MTLFAST_DISPATCH_DTYPE(code, ...)                         \
  switch (code) {                                                 \
    case MTLFAST_F32: { using scalar_t = float; __VA_ARGS__; break; } \
    case MTLFAST_F16: { using scalar_t = __half; __VA_ARGS__; break; } \
    case MTLFAST_BF16: { using scalar_t = __nv_bfloat16; __VA_ARGS__; break; } \
    default: return static_cast<int>(cudaErrorInvalidValue);     \
  }
