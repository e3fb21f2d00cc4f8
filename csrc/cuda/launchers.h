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
// out[p] = s * sum_t w[t] G[t, p] (+ out[p] when accumulate), s = scale * *scale_ptr (read on
// the device; scale alone when scale_ptr is null). out has G's dtype. T <= 1024.
int mtlfast_cuda_combine(const float* w, const void* G, int dtype, int64_t T, int64_t P,
                         int64_t ld, void* out, int accumulate, float scale,
                         const float* scale_ptr, void* stream);
// GradDrop (Chen et al. 2020): out[p] = sum_t (l_t + (1 - l_t) M_tp) G[t, p] with the
// sign-purity mask M of the caller's uniform draws u (P, fp32, device) and leaks l (T, fp32,
// device; null: no leak); NaN for a column whose sum |G[t, p]| is not finite.
int mtlfast_cuda_graddrop(const void* G, int dtype, int64_t T, int64_t P, int64_t ld,
                          const float* u, const float* leak, void* out, void* stream);
// PCGrad coefficients (mtlfast/ops/solvers.py) for `batch` float64 Grams K (batch, T, T) with
// int64 orders of the same shape, one block per problem. T <= 64.
int mtlfast_cuda_pcgrad(const double* K, const int64_t* orders, int64_t batch, int64_t T,
                        double* C, void* stream);
// PCGrad's random orders (batch, T, T) from the device state [seed, step] (csrc/common/philox.h:
// the CPU op's draws), then step += 1 on the device.
int mtlfast_cuda_pcgrad_orders(int64_t* state, int64_t batch, int64_t T, int64_t* orders,
                               void* stream);
// The shared-core solvers (csrc/common/solver_core.h), float64, one block per problem, T <= 64.
// nnqp: A (nA, T, T), b and x (nA, m, T); problem p solves with A[p / m] and b[p].
int mtlfast_cuda_nnqp(const double* A, const double* b, int64_t nA, int64_t m, int64_t T,
                      int simplex, int64_t steps, double tol, double* x, void* stream);
// CAGrad's inner problem: A (batch, T, T), p and w (batch, T).
int mtlfast_cuda_cagrad(const double* A, const double* p, int64_t batch, int64_t T, double c,
                        int64_t root_steps, int64_t qp_steps, double tol, double* w,
                        void* stream);
// Positive root of K w = w^(-1/alpha): K (batch, T, T), w (batch, T).
int mtlfast_cuda_power_fixed_point(const double* K, int64_t batch, int64_t T, double alpha,
                                   int64_t iters, double* w, void* stream);
// IMTL-G weights of scaled Grams K (batch, T, T): w (batch, T).
int mtlfast_cuda_imtl_weights(const double* K, int64_t batch, int64_t T, double sum_tol,
                              double* w, void* stream);
// Ascending eigenvalues lam (batch, T) and eigenvectors V (batch, T, T) of sym(K).
int mtlfast_cuda_sym_eig(const double* K, int64_t batch, int64_t T, double* lam, double* V,
                         void* stream);

#ifdef __cplusplus
}
#endif
