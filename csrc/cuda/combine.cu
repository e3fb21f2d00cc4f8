// out = scale * (w @ G) (+ out): one pass over G. Each thread owns 16 bytes of columns
// (4 fp32 or 8 fp16/bf16), reads the matching 16-byte vector of every row, and writes one
// vector of out; w (times the scale) sits in shared memory. Rows that are not 16-byte
// aligned, and the ragged last vector, take scalar loads.
#include "common.cuh"

namespace mtlfast {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxT = 1024;

template <typename T>
__global__ void __launch_bounds__(kThreads) combine_kernel(
    const float* __restrict__ w, const T* __restrict__ G, int nT, int64_t P, int64_t ld,
    T* __restrict__ out, int accumulate, float scale, const float* __restrict__ scale_ptr,
    bool vec) {
  constexpr int V = Vec<T>::kLanes;
  __shared__ float ws[kMaxT];
  const float sc = scale_ptr != nullptr ? scale * *scale_ptr : scale;
  for (int t = threadIdx.x; t < nT; t += kThreads) ws[t] = w[t] * sc;
  __syncthreads();
  for (int64_t col = (blockIdx.x * (int64_t)kThreads + threadIdx.x) * V; col < P;
       col += (int64_t)gridDim.x * kThreads * V) {
    float acc[V];
#pragma unroll
    for (int k = 0; k < V; ++k) acc[k] = 0.f;
    const bool full = vec && col + V <= P;
    const T* g = G + col;
    if (full) {
#pragma unroll 4
      for (int t = 0; t < nT; ++t) {
        float f[V];
        unpack<T>(load_vec(g + t * ld), f);
        const float wt = ws[t];
#pragma unroll
        for (int k = 0; k < V; ++k) acc[k] = fmaf(wt, f[k], acc[k]);
      }
    } else {
      for (int t = 0; t < nT; ++t) {
        float f[V];
        unpack<T>(load_vec_scalar(g + t * ld, P - col), f);
        const float wt = ws[t];
#pragma unroll
        for (int k = 0; k < V; ++k) acc[k] = fmaf(wt, f[k], acc[k]);
      }
    }
    T* o = out + col;
    if (full) {
      if (accumulate) {
        float f[V];
        unpack<T>(*reinterpret_cast<const uint4*>(o), f);
#pragma unroll
        for (int k = 0; k < V; ++k) acc[k] += f[k];
      }
      *reinterpret_cast<uint4*>(o) = pack<T>(acc);
    } else {
      for (int k = 0; k < V && col + k < P; ++k)
        o[k] = from_float<T>(accumulate ? acc[k] + to_float(o[k]) : acc[k]);
    }
  }
}

}  // namespace
}  // namespace mtlfast

extern "C" int mtlfast_cuda_combine(const float* w, const void* G, int dtype, int64_t T,
                                    int64_t P, int64_t ld, void* out, int accumulate,
                                    float scale, const float* scale_ptr, void* stream) {
  using namespace mtlfast;
  if (T <= 0 || T > kMaxT || P <= 0) return static_cast<int>(cudaErrorInvalidValue);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  MTLFAST_DISPATCH_DTYPE(dtype, {
    constexpr int V = Vec<scalar_t>::kLanes;
    const bool vec = rows_aligned16(G, ld, sizeof(scalar_t)) &&
                     reinterpret_cast<uintptr_t>(out) % 16 == 0;
    int64_t blocks = (P + (int64_t)kThreads * V - 1) / ((int64_t)kThreads * V);
    const int wave = one_wave_blocks(combine_kernel<scalar_t>, kThreads);
    if (wave > 0 && blocks > wave) blocks = wave;
    combine_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, 0, s>>>(
        w, static_cast<const scalar_t*>(G), static_cast<int>(T), P, ld,
        static_cast<scalar_t*>(out), accumulate, scale, scale_ptr, vec);
  });
  return static_cast<int>(cudaGetLastError());
}
