// Batched T x T solvers on the GPU, one thread block per problem.
//
// pcgrad: PCGrad's projection recursion on the Gram (mtlfast/ops/solvers.py,
// pcgrad_weights_reference): C = I; for step s = 0..T-1 and every row i at once,
// j = orders[i, s], p = (C K)_ij, and C_ij -= p / K_jj when p < 0, K_jj > 0 and j != i.
// Row i of C depends only on row i and on K, so one thread per row runs all T steps with no
// barrier; the row lives in shared memory (T <= 64: 64 x 65 doubles = 33 KB).
#include "common.cuh"

namespace mtlfast {
namespace {

constexpr int kMaxSolverT = 64;

__global__ void pcgrad_kernel(const double* __restrict__ K, const int64_t* __restrict__ orders,
                              int T, double* __restrict__ C) {
  extern __shared__ double rows[];  // T x (T + 1): row i of C for thread i
  const int64_t off = (int64_t)blockIdx.x * T * T;
  K += off;
  orders += off;
  C += off;
  for (int i = threadIdx.x; i < T; i += blockDim.x) {
    double* c = rows + i * (T + 1);
    for (int k = 0; k < T; ++k) c[k] = k == i ? 1.0 : 0.0;
    for (int s = 0; s < T; ++s) {
      const int64_t j = orders[(int64_t)i * T + s];
      if (j < 0 || j >= T || j == i) continue;  // the reference skips j == i
      const double* kj = K + j * T;
      double p = 0.0;
      for (int k = 0; k < T; ++k) p = fma(__ldg(kj + k), c[k], p);
      const double kjj = __ldg(kj + j);
      if (p < 0.0 && kjj > 0.0) c[j] -= p / kjj;
    }
    for (int k = 0; k < T; ++k) C[(int64_t)i * T + k] = c[k];
  }
}

}  // namespace
}  // namespace mtlfast

extern "C" int mtlfast_cuda_pcgrad(const double* K, const int64_t* orders, int64_t batch,
                                   int64_t T, double* C, void* stream) {
  using namespace mtlfast;
  if (T <= 0 || T > kMaxSolverT || batch <= 0 || batch > 0x7fffffff)
    return static_cast<int>(cudaErrorInvalidValue);
  const int threads = T <= 32 ? 32 : 64;
  const size_t smem = static_cast<size_t>(T) * (T + 1) * sizeof(double);
  pcgrad_kernel<<<static_cast<unsigned>(batch), threads, smem, static_cast<cudaStream_t>(stream)>>>(
      K, orders, static_cast<int>(T), C);
  return static_cast<int>(cudaGetLastError());
}
