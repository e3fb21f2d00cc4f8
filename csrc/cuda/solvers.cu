// Batched T x T solvers on the GPU, one thread block per problem.
//
// nnqp (MGDA, CAGrad, UPGrad, DualProj), cagrad, power_fixed_point (Nash-MTL, FairGrad),
// imtl_weights (IMTL-G) and sym_eig (Aligned-MTL, ConFIG) run the code of the CPU ops:
// csrc/common/solver_core.h, here on a BlockTeam (the block's threads, __syncthreads, warp-shuffle
// reductions broadcast from lane 0 so every thread holds the same bits), with the problem and
// the whole workspace in dynamic shared memory (T <= 64: at most ~75 KB, above the 48 KB default,
// so the launchers raise the kernel's limit). Blocks of 32 threads for T <= 32, 64 beyond (the
// Jacobi kernels: up to 256).
//
// pcgrad: PCGrad's projection recursion on the Gram (mtlfast/ops/solvers.py,
// pcgrad_weights_reference): C = I; for step s = 0..T-1 and every row i at once,
// j = orders[i, s], p = (C K)_ij, and C_ij -= p / K_jj when p < 0, K_jj > 0 and j != i.
// Row i of C depends only on row i and on K, so each row is one warp's job with no block
// barrier: per step the 32 lanes split the dot product (C K)_ij and reduce it with a butterfly
// (lanes add the same pairs, so every lane holds the same p), and lane 0 updates C_ij. The row
// lives in shared memory (T <= 64: 64 x 65 doubles = 33 KB). A first version with one thread
// per row ran 77 us at T=32 on an H200: a serial chain of T^2 dependent loads and FMAs.
#include "common.cuh"
#include "../common/philox.h"
#include "../common/solver_core.h"

namespace mtlfast {
namespace {

constexpr int kMaxSolverT = 64;

__global__ void pcgrad_kernel(const double* __restrict__ K, const int64_t* __restrict__ orders,
                              int T, double* __restrict__ C) {
  extern __shared__ double rows[];  // T x (T + 1): row i of C, for the warp that owns row i
  const int64_t off = (int64_t)blockIdx.x * T * T;
  K += off;
  orders += off;
  C += off;
  const int lane = threadIdx.x & 31, warps = blockDim.x >> 5;
  for (int i = threadIdx.x >> 5; i < T; i += warps) {
    double* c = rows + i * (T + 1);
    for (int k = lane; k < T; k += 32) c[k] = k == i ? 1.0 : 0.0;
    __syncwarp();
    for (int s = 0; s < T; ++s) {
      const int64_t j = orders[(int64_t)i * T + s];  // the same for every lane
      if (j < 0 || j >= T || j == i) continue;       // the reference skips j == i
      const double* kj = K + j * T;
      double p = 0.0;
      for (int k = lane; k < T; k += 32) p = fma(__ldg(kj + k), c[k], p);
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) p += __shfl_xor_sync(0xffffffffu, p, o);
      const double kjj = __ldg(kj + j);
      if (lane == 0 && p < 0.0 && kjj > 0.0) c[j] -= p / kjj;
      __syncwarp();
    }
    for (int k = lane; k < T; k += 32) C[(int64_t)i * T + k] = c[k];
  }
}


// The thread block as a solver team (csrc/common/team.h). Every thread calls each reduction
// (the core keeps control flow uniform); blockDim.x is a multiple of 32, at most 1024.
struct BlockTeam {
  double* red_v;  // 32 doubles of shared scratch
  int* red_i;     // 32 ints of shared scratch

  __device__ int rank() const { return threadIdx.x; }
  __device__ int size() const { return blockDim.x; }
  __device__ void sync() const { __syncthreads(); }

  template <class Op>
  __device__ double reduce(double v, Op op) const {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_down_sync(0xffffffffu, v, o));
    if (blockDim.x == 32) return __shfl_sync(0xffffffffu, v, 0);
    if ((threadIdx.x & 31) == 0) red_v[threadIdx.x >> 5] = v;
    __syncthreads();
    double t = red_v[0];
    for (int w = 1; w < static_cast<int>(blockDim.x >> 5); ++w) t = op(t, red_v[w]);
    __syncthreads();
    return t;
  }
  __device__ double sum(double v) const {
    return reduce(v, [](double a, double b) { return a + b; });
  }
  __device__ double max(double v) const {
    return reduce(v, [](double a, double b) { return core::max_(a, b); });
  }

  template <bool kMax>
  __device__ core::Arg arg(core::Arg a) const {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const double v = __shfl_down_sync(0xffffffffu, a.v, o);
      const int i = __shfl_down_sync(0xffffffffu, a.i, o);
      if (kMax ? core::beats_max(v, i, a) : core::beats_min(v, i, a)) a = core::Arg{v, i};
    }
    a.v = __shfl_sync(0xffffffffu, a.v, 0);
    a.i = __shfl_sync(0xffffffffu, a.i, 0);
    if (blockDim.x == 32) return a;
    if ((threadIdx.x & 31) == 0) {
      red_v[threadIdx.x >> 5] = a.v;
      red_i[threadIdx.x >> 5] = a.i;
    }
    __syncthreads();
    core::Arg t{red_v[0], red_i[0]};
    for (int w = 1; w < static_cast<int>(blockDim.x >> 5); ++w)
      if (kMax ? core::beats_max(red_v[w], red_i[w], t) : core::beats_min(red_v[w], red_i[w], t))
        t = core::Arg{red_v[w], red_i[w]};
    __syncthreads();
    return t;
  }
  __device__ core::Arg argmax(core::Arg a) const { return arg<true>(a); }
  __device__ core::Arg argmin(core::Arg a) const { return arg<false>(a); }
};

constexpr int kScratch = 32;  // doubles and ints of BlockTeam scratch

__host__ __device__ inline int solver_threads(int T) { return T <= 32 ? 32 : 64; }
// The Jacobi rounds rotate T/2 pairs over T columns: T^2/2 independent updates per pass.
__host__ __device__ inline int jacobi_threads(int T) { return T <= 8 ? 32 : T <= 32 ? 128 : 256; }

// Shared memory of each kernel: doubles then ints (8-byte then 4-byte items: no padding).
__host__ __device__ inline size_t smem_bytes(int doubles, int ints) {
  return static_cast<size_t>(doubles + kScratch) * sizeof(double) +
         static_cast<size_t>(ints + kScratch) * sizeof(int);
}
__host__ __device__ inline int nnqp_doubles(int T) { return T * T + 2 * T + core::nnqp_ws_doubles(T); }
__host__ __device__ inline int cagrad_doubles(int T) { return T * T + 2 * T + core::cagrad_ws_doubles(T); }

// A (nA, T, T), b (nA, m, T): problem p uses A[p / m] and b[p]; x like b.
__global__ void nnqp_kernel(const double* __restrict__ A, const double* __restrict__ b, int T,
                            long long m, bool simplex, long long steps, double tol,
                            double* __restrict__ x) {
  extern __shared__ double smem[];
  const long long prob = blockIdx.x;
  double* sA = smem;
  double* sb = sA + T * T;
  double* sx = sb + T;
  double* ws = sx + T;
  double* red_v = smem + nnqp_doubles(T);
  int* iws = reinterpret_cast<int*>(red_v + kScratch);
  BlockTeam team{red_v, iws + core::nnqp_ws_ints(T)};
  A += (prob / m) * T * T;
  for (int i = threadIdx.x; i < T * T; i += blockDim.x) sA[i] = A[i];
  for (int i = threadIdx.x; i < T; i += blockDim.x) sb[i] = b[prob * T + i];
  __syncthreads();
  core::nnqp_solve(team, sA, sb, T, simplex, steps, tol, sx, ws, iws);
  for (int i = threadIdx.x; i < T; i += blockDim.x) x[prob * T + i] = sx[i];
}

__global__ void cagrad_kernel(const double* __restrict__ A, const double* __restrict__ p, int T,
                              double c, long long root_steps, long long qp_steps, double tol,
                              double* __restrict__ w) {
  extern __shared__ double smem[];
  const long long prob = blockIdx.x;
  double* sA = smem;
  double* sp = sA + T * T;
  double* sw = sp + T;
  double* ws = sw + T;
  double* red_v = smem + cagrad_doubles(T);
  int* iws = reinterpret_cast<int*>(red_v + kScratch);
  BlockTeam team{red_v, iws + core::cagrad_ws_ints(T)};
  A += prob * T * T;
  for (int i = threadIdx.x; i < T * T; i += blockDim.x) sA[i] = A[i];
  for (int i = threadIdx.x; i < T; i += blockDim.x) sp[i] = p[prob * T + i];
  __syncthreads();
  core::cagrad_solve(team, sA, sp, T, c, root_steps, qp_steps, tol, sw, ws, iws);
  for (int i = threadIdx.x; i < T; i += blockDim.x) w[prob * T + i] = sw[i];
}

// K is read once, at the start, from global memory; the workspace and w live in shared memory.
__global__ void power_fixed_point_kernel(const double* __restrict__ K, int n, double alpha,
                                         long long iters, double* __restrict__ w) {
  extern __shared__ double smem[];
  const long long prob = blockIdx.x;
  double* sw = smem;
  double* ws = sw + n;
  double* red_v = ws + core::power_fixed_point_ws_doubles(n);
  BlockTeam team{red_v, reinterpret_cast<int*>(red_v + kScratch)};
  core::power_fixed_point_solve(team, K + prob * n * n, n, alpha, iters, sw, ws);
  for (int i = threadIdx.x; i < n; i += blockDim.x) w[prob * n + i] = sw[i];
}

__global__ void imtl_kernel(const double* __restrict__ K, int n, double sum_tol,
                            double* __restrict__ w) {
  extern __shared__ double smem[];
  const long long prob = blockIdx.x;
  double* sw = smem;
  double* ws = sw + n;
  double* red_v = ws + core::imtl_ws_doubles(n);
  BlockTeam team{red_v, reinterpret_cast<int*>(red_v + kScratch)};
  core::imtl_solve(team, K + prob * n * n, n, sum_tol, sw, ws);
  for (int i = threadIdx.x; i < n; i += blockDim.x) w[prob * n + i] = sw[i];
}

__global__ void sym_eig_kernel(const double* __restrict__ K, int n, double* __restrict__ lam,
                               double* __restrict__ V) {
  extern __shared__ double smem[];
  const long long prob = blockIdx.x;
  double* red_v = smem + core::sym_eig_ws_doubles(n);
  BlockTeam team{red_v, reinterpret_cast<int*>(red_v + kScratch)};
  core::sym_eig_solve(team, K + prob * n * n, n, lam + prob * n, V + prob * n * n, smem);
}

// Validates (T, batch) and raises the kernel's shared-memory limit when it needs more than the
// default 48 KB. The limit is set once per device and size (`configured`, one slot per device),
// so a launch inside a CUDA-graph capture (after an eager warm-up) makes no attribute call.
constexpr int kMaxDevices = 64;

template <class Kernel>
int prepare(Kernel kernel, int64_t T, int64_t batch, size_t smem, size_t* configured) {
  if (T <= 0 || T > kMaxSolverT || batch <= 0 || batch > 0x7fffffff)
    return static_cast<int>(cudaErrorInvalidValue);
  if (smem <= 48 * 1024) return 0;
  int dev = 0;
  if (cudaError_t err = cudaGetDevice(&dev)) return static_cast<int>(err);
  if (dev < 0 || dev >= kMaxDevices) return static_cast<int>(cudaErrorInvalidDevice);
  if (configured[dev] >= smem) return 0;
  const cudaError_t err = cudaFuncSetAttribute(
      kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (err == cudaSuccess) configured[dev] = smem;
  return static_cast<int>(err);
}

// PCGrad's random orders: one thread per row (csrc/common/philox.h), reading [seed, step] on the
// device; the step is advanced by a second one-thread kernel on the same stream, after every
// row has read it.
__global__ void pcgrad_orders_kernel(const int64_t* __restrict__ state, int T, long long rows,
                                     int64_t* __restrict__ orders) {
  const long long r = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= rows) return;
  core::random_order(static_cast<uint64_t>(state[0]), static_cast<uint64_t>(state[1]),
                     static_cast<uint32_t>(r / T), static_cast<uint32_t>(r % T), T, orders + r * T);
}

__global__ void advance_step_kernel(int64_t* state) { state[1] += 1; }

}  // namespace
}  // namespace mtlfast

extern "C" int mtlfast_cuda_pcgrad(const double* K, const int64_t* orders, int64_t batch,
                                   int64_t T, double* C, void* stream) {
  using namespace mtlfast;
  if (T <= 0 || T > kMaxSolverT || batch <= 0 || batch > 0x7fffffff)
    return static_cast<int>(cudaErrorInvalidValue);
  const int threads = 32 * static_cast<int>(T < 32 ? T : 32);  // one warp per row (<= 2 rows)
  const size_t smem = static_cast<size_t>(T) * (T + 1) * sizeof(double);
  pcgrad_kernel<<<static_cast<unsigned>(batch), threads, smem, static_cast<cudaStream_t>(stream)>>>(
      K, orders, static_cast<int>(T), C);
  return static_cast<int>(cudaGetLastError());
}

extern "C" int mtlfast_cuda_nnqp(const double* A, const double* b, int64_t nA, int64_t m,
                                 int64_t T, int simplex, int64_t steps, double tol, double* x,
                                 void* stream) {
  using namespace mtlfast;
  if (nA <= 0 || m <= 0 || nA > 0x7fffffff / m) return static_cast<int>(cudaErrorInvalidValue);
  const int t = static_cast<int>(T);
  const size_t smem = smem_bytes(nnqp_doubles(t), core::nnqp_ws_ints(t));
  static size_t configured[kMaxDevices] = {};
  if (int err = prepare(nnqp_kernel, T, nA * m, smem, configured)) return err;
  nnqp_kernel<<<static_cast<unsigned>(nA * m), solver_threads(t), smem,
                static_cast<cudaStream_t>(stream)>>>(A, b, t, m, simplex != 0, steps, tol, x);
  return static_cast<int>(cudaGetLastError());
}

extern "C" int mtlfast_cuda_cagrad(const double* A, const double* p, int64_t batch, int64_t T,
                                   double c, int64_t root_steps, int64_t qp_steps, double tol,
                                   double* w, void* stream) {
  using namespace mtlfast;
  const int t = static_cast<int>(T);
  const size_t smem = smem_bytes(cagrad_doubles(t), core::cagrad_ws_ints(t));
  static size_t configured[kMaxDevices] = {};
  if (int err = prepare(cagrad_kernel, T, batch, smem, configured)) return err;
  cagrad_kernel<<<static_cast<unsigned>(batch), solver_threads(t), smem,
                  static_cast<cudaStream_t>(stream)>>>(A, p, t, c, root_steps, qp_steps, tol, w);
  return static_cast<int>(cudaGetLastError());
}

extern "C" int mtlfast_cuda_power_fixed_point(const double* K, int64_t batch, int64_t T,
                                              double alpha, int64_t iters, double* w,
                                              void* stream) {
  using namespace mtlfast;
  const int t = static_cast<int>(T);
  const size_t smem = smem_bytes(t + core::power_fixed_point_ws_doubles(t), 0);
  static size_t configured[kMaxDevices] = {};
  if (int err = prepare(power_fixed_point_kernel, T, batch, smem, configured)) return err;
  power_fixed_point_kernel<<<static_cast<unsigned>(batch), solver_threads(t), smem,
                             static_cast<cudaStream_t>(stream)>>>(K, t, alpha, iters, w);
  return static_cast<int>(cudaGetLastError());
}

extern "C" int mtlfast_cuda_imtl_weights(const double* K, int64_t batch, int64_t T,
                                         double sum_tol, double* w, void* stream) {
  using namespace mtlfast;
  const int t = static_cast<int>(T);
  const size_t smem = smem_bytes(t + core::imtl_ws_doubles(t), 0);
  static size_t configured[kMaxDevices] = {};
  if (int err = prepare(imtl_kernel, T, batch, smem, configured)) return err;
  imtl_kernel<<<static_cast<unsigned>(batch), jacobi_threads(t), smem,
                static_cast<cudaStream_t>(stream)>>>(K, t, sum_tol, w);
  return static_cast<int>(cudaGetLastError());
}

extern "C" int mtlfast_cuda_sym_eig(const double* K, int64_t batch, int64_t T, double* lam,
                                    double* V, void* stream) {
  using namespace mtlfast;
  const int t = static_cast<int>(T);
  const size_t smem = smem_bytes(core::sym_eig_ws_doubles(t), 0);
  static size_t configured[kMaxDevices] = {};
  if (int err = prepare(sym_eig_kernel, T, batch, smem, configured)) return err;
  sym_eig_kernel<<<static_cast<unsigned>(batch), jacobi_threads(t), smem,
                   static_cast<cudaStream_t>(stream)>>>(K, t, lam, V);
  return static_cast<int>(cudaGetLastError());
}

extern "C" int mtlfast_cuda_pcgrad_orders(int64_t* state, int64_t batch, int64_t T,
                                          int64_t* orders, void* stream) {
  using namespace mtlfast;
  if (T <= 0 || T > 0x7fffffff || batch <= 0 || batch > 0xffffffffll)
    return static_cast<int>(cudaErrorInvalidValue);
  const long long rows = batch * T;
  const int threads = 128;
  const long long blocks = (rows + threads - 1) / threads;
  if (blocks > 0x7fffffff) return static_cast<int>(cudaErrorInvalidValue);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  pcgrad_orders_kernel<<<static_cast<unsigned>(blocks), threads, 0, s>>>(state, static_cast<int>(T),
                                                                         rows, orders);
  advance_step_kernel<<<1, 1, 0, s>>>(state);
  return static_cast<int>(cudaGetLastError());
}
