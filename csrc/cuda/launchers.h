// C interface of the CUDA kernels. Raw pointers and a stream handle only, so the torch side
// (csrc/cuda/cuda_ops.cpp) compiles with nothing but the torch headers.
#pragma once
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Element types of G.
enum { MTLFAST_F32 = 0, MTLFAST_F16 = 1, MTLFAST_BF16 = 2 };

// Workspace (in floats) that mtlfast_cuda_gram needs for a (T, P) input.
int64_t mtlfast_cuda_gram_workspace(int64_t T, int64_t P);
// K (T x T, fp32, full symmetric) = G G^T; G rows are ld elements apart. Returns cudaError_t.
int mtlfast_cuda_gram(const void* G, int dtype, int64_t T, int64_t P, int64_t ld, float* K,
                      float* workspace, void* stream);
// out[p] = scale * sum_t w[t] G[t, p] (+ out[p] when accumulate). out has G's dtype.
int mtlfast_cuda_combine(const float* w, const void* G, int dtype, int64_t T, int64_t P,
                         int64_t ld, void* out, int accumulate, float scale, void* stream);

#ifdef __cplusplus
}
#endif
