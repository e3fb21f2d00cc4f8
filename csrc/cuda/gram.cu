// K = G G^T on the GPU. Rows are tiled in blocks of 32; grid.y enumerates the upper-triangle
// pairs of row blocks, grid.x splits P. Each block accumulates its 32 x 32 partial product in
// registers (2 x 2 per thread) from shared-memory column tiles, writes it to a workspace, and
// a second kernel sums the splits in a fixed order: deterministic, no atomics.
#include "common.cuh"

namespace mtlfast {
namespace {

constexpr int kRows = 32;     // rows per row block
constexpr int kCols = 32;     // columns per shared-memory tile
constexpr int kThreads = 256; // 16 x 16 threads, 2 x 2 outputs each
constexpr int kMaxSplits = 1024;

__host__ __device__ inline int64_t row_blocks(int64_t T) { return (T + kRows - 1) / kRows; }

inline int64_t splits_for(int64_t P) {
  int64_t s = (P + 4 * kCols - 1) / (4 * kCols);
  return s < 1 ? 1 : (s > kMaxSplits ? kMaxSplits : s);
}

template <typename T>
__global__ void gram_partial_kernel(const T* __restrict__ G, int64_t nT, int64_t P, int64_t ld,
                                    float* __restrict__ ws) {
  __shared__ float A[kRows][kCols + 1];
  __shared__ float B[kRows][kCols + 1];
  // Decode the upper-triangle pair (bi <= bj) of row blocks from blockIdx.y.
  const int64_t nb = row_blocks(nT);
  int64_t pair = blockIdx.y, bi = 0;
  while (pair >= nb - bi) { pair -= nb - bi; ++bi; }
  const int64_t bj = bi + pair;
  const int64_t r0 = bi * kRows, c0 = bj * kRows;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  float acc[2][2] = {{0.f, 0.f}, {0.f, 0.f}};
  for (int64_t col = blockIdx.x * (int64_t)kCols; col < P; col += (int64_t)gridDim.x * kCols) {
    for (int e = threadIdx.x; e < kRows * kCols; e += kThreads) {
      const int r = e / kCols, c = e % kCols;
      const int64_t p = col + c;
      const bool in_p = p < P;
      A[r][c] = (in_p && r0 + r < nT) ? to_float(G[(r0 + r) * ld + p]) : 0.f;
      B[r][c] = (in_p && c0 + r < nT) ? to_float(G[(c0 + r) * ld + p]) : 0.f;
    }
    __syncthreads();
#pragma unroll 8
    for (int c = 0; c < kCols; ++c) {
      const float a0 = A[2 * ty][c], a1 = A[2 * ty + 1][c];
      const float b0 = B[2 * tx][c], b1 = B[2 * tx + 1][c];
      acc[0][0] += a0 * b0; acc[0][1] += a0 * b1;
      acc[1][0] += a1 * b0; acc[1][1] += a1 * b1;
    }
    __syncthreads();
  }
  float* out = ws + ((int64_t)blockIdx.y * gridDim.x + blockIdx.x) * kRows * kRows;
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 2; ++j) out[(2 * ty + i) * kRows + 2 * tx + j] = acc[i][j];
}

__global__ void gram_reduce_kernel(const float* __restrict__ ws, int64_t nT, int splits,
                                   float* __restrict__ K) {
  const int64_t nb = row_blocks(nT);
  int64_t pair = blockIdx.x, bi = 0;
  while (pair >= nb - bi) { pair -= nb - bi; ++bi; }
  const int64_t bj = bi + pair;
  for (int e = threadIdx.x; e < kRows * kRows; e += blockDim.x) {
    const int64_t i = bi * kRows + e / kRows, j = bj * kRows + e % kRows;
    if (i >= nT || j >= nT) continue;
    const float* src = ws + (int64_t)blockIdx.x * splits * kRows * kRows + e;
    float s = 0.f;
    for (int k = 0; k < splits; ++k) s += src[(int64_t)k * kRows * kRows];
    K[i * nT + j] = s;
    K[j * nT + i] = s;
  }
}

}  // namespace
}  // namespace mtlfast

extern "C" int64_t mtlfast_cuda_gram_workspace(int64_t T, int64_t P) {
  const int64_t nb = mtlfast::row_blocks(T);
  return nb * (nb + 1) / 2 * mtlfast::splits_for(P) * mtlfast::kRows * mtlfast::kRows;
}

extern "C" int mtlfast_cuda_gram(const void* G, int dtype, int64_t T, int64_t P, int64_t ld,
                                 float* K, float* workspace, void* stream) {
  using namespace mtlfast;
  if (T <= 0 || P <= 0) return static_cast<int>(cudaErrorInvalidValue);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const int64_t nb = row_blocks(T);
  const int splits = static_cast<int>(splits_for(P));
  dim3 grid(splits, static_cast<unsigned>(nb * (nb + 1) / 2));
  MTLFAST_DISPATCH_DTYPE(dtype, gram_partial_kernel<scalar_t><<<grid, kThreads, 0, s>>>(
      static_cast<const scalar_t*>(G), T, P, ld, workspace));
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return static_cast<int>(err);
  gram_reduce_kernel<<<static_cast<unsigned>(nb * (nb + 1) / 2), 256, 0, s>>>(workspace, T,
                                                                              splits, K);
  return static_cast<int>(cudaGetLastError());
}
