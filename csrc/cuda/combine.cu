// out = scale * (w @ G) (+ out): one pass over G, one thread per column, w in shared memory.
#include "common.cuh"

namespace mtlfast {
namespace {

constexpr int kMaxT = 1024;

template <typename T>
__global__ void combine_kernel(const float* __restrict__ w, const T* __restrict__ G, int64_t nT,
                               int64_t P, int64_t ld, T* __restrict__ out, int accumulate,
                               float scale) {
  __shared__ float ws[kMaxT];
  for (int t = threadIdx.x; t < nT; t += blockDim.x) ws[t] = w[t];
  __syncthreads();
  for (int64_t p = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; p < P;
       p += (int64_t)gridDim.x * blockDim.x) {
    float s = 0.f;
    for (int64_t t = 0; t < nT; ++t) s += ws[t] * to_float(G[t * ld + p]);
    s *= scale;
    if (accumulate) s += to_float(out[p]);
    out[p] = from_float<T>(s);
  }
}

}  // namespace
}  // namespace mtlfast

extern "C" int mtlfast_cuda_combine(const float* w, const void* G, int dtype, int64_t T,
                                    int64_t P, int64_t ld, void* out, int accumulate,
                                    float scale, void* stream) {
  using namespace mtlfast;
  if (T <= 0 || T > kMaxT || P <= 0) return static_cast<int>(cudaErrorInvalidValue);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const int threads = 256;
  int64_t blocks = (P + threads - 1) / threads;
  if (blocks > 65535) blocks = 65535;
  MTLFAST_DISPATCH_DTYPE(dtype, combine_kernel<scalar_t><<<(unsigned)blocks, threads, 0, s>>>(
      w, static_cast<const scalar_t*>(G), T, P, ld, static_cast<scalar_t*>(out), accumulate,
      scale));
  return static_cast<int>(cudaGetLastError());
}
