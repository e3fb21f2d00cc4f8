// GradDrop (Chen et al. 2020, "Just Pick a Sign") in one pass over G (T, P):
//   purity  P_p = 0.5 * (1 + sum_t G[t,p] / sum_t |G[t,p]|)
//   keep G[t,p] when (P_p > U_p and G[t,p] > 0) or (P_p < U_p and G[t,p] < 0)
//   out[p] = sum of the kept entries; NaN when sum_t |G[t,p]| is not finite.
// U_p is a counter-based hash of (seed, p), so any implementation reproduces the mask; the
// torch reference (mtlfast/ops/graddrop.py) does the same fp32 operations in the same order
// (sums in row order, round-to-nearest ops that the compiler may not fuse), so kernel and
// reference agree bit for bit. T <= 16 keeps a column's values in registers between the
// two passes; larger T reads them again (from L2 for all but huge T).
#include "common.cuh"

namespace mtlfast {
namespace {

constexpr int kThreads = 256;
constexpr int kRegRows = 16;

// Chris Wellons' lowbias32 integer hash.
__host__ __device__ inline uint32_t lowbias32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

__host__ __device__ inline uint32_t seed_key(uint64_t seed) {
  return lowbias32(static_cast<uint32_t>(seed) ^
                   lowbias32(static_cast<uint32_t>(seed >> 32) ^ 0x9e3779b9u));
}

// Uniform in [0, 1) on a 2^-24 grid, exact in fp32.
__device__ __forceinline__ float column_uniform(uint32_t key, uint64_t p) {
  const uint32_t x =
      lowbias32(lowbias32(static_cast<uint32_t>(p) ^ key) ^ static_cast<uint32_t>(p >> 32));
  return static_cast<float>(x >> 8) * 5.9604644775390625e-08f;
}

template <typename T>
__device__ __forceinline__ uint4 load_row(const T* p, bool full, int64_t valid) {
  return full ? __ldg(reinterpret_cast<const uint4*>(p)) : load_vec_scalar(p, valid);
}

template <typename T, int MAXT>  // MAXT > 0: nT <= MAXT rows held in registers
__global__ void __launch_bounds__(kThreads) graddrop_kernel(const T* __restrict__ G, int nT,
                                                            int64_t P, int64_t ld, uint32_t key,
                                                            T* __restrict__ out, bool vec) {
  constexpr int V = Vec<T>::kLanes;
  constexpr int kRaw = MAXT > 0 ? MAXT : 1;
  for (int64_t col = (blockIdx.x * (int64_t)kThreads + threadIdx.x) * V; col < P;
       col += (int64_t)gridDim.x * kThreads * V) {
    const bool full = vec && col + V <= P;
    const T* g = G + col;
    uint4 raw[kRaw];
    float S[V], A[V], kept[V], pur[V], u[V], f[V];
#pragma unroll
    for (int k = 0; k < V; ++k) S[k] = A[k] = kept[k] = 0.f;
    // Row t's values as floats: from registers (MAXT > 0; t a compile-time index after
    // unrolling, so raw[] never goes to local memory) or from memory again.
    auto row = [&](int t) {
      if constexpr (MAXT > 0) unpack<T>(raw[t], f);
      else unpack<T>(load_row(g + t * ld, full, P - col), f);
    };
    auto add_sums = [&]() {
#pragma unroll
      for (int k = 0; k < V; ++k) {
        S[k] = __fadd_rn(S[k], f[k]);
        A[k] = __fadd_rn(A[k], fabsf(f[k]));
      }
    };
    auto add_kept = [&]() {
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const bool keep = (pur[k] > u[k] && f[k] > 0.f) || (pur[k] < u[k] && f[k] < 0.f);
        kept[k] = __fadd_rn(kept[k], keep ? f[k] : 0.f);
      }
    };
    if constexpr (MAXT > 0) {
#pragma unroll
      for (int t = 0; t < MAXT; ++t)
        if (t < nT) raw[t] = load_row(g + t * ld, full, P - col);
#pragma unroll
      for (int t = 0; t < MAXT; ++t)
        if (t < nT) { row(t); add_sums(); }
    } else {
      for (int t = 0; t < nT; ++t) { row(t); add_sums(); }
    }
#pragma unroll
    for (int k = 0; k < V; ++k) {
      pur[k] = __fmul_rn(0.5f, __fadd_rn(1.0f, __fdiv_rn(S[k], A[k])));
      u[k] = column_uniform(key, static_cast<uint64_t>(col + k));
    }
    if constexpr (MAXT > 0) {
#pragma unroll
      for (int t = 0; t < MAXT; ++t)
        if (t < nT) { row(t); add_kept(); }
    } else {
      for (int t = 0; t < nT; ++t) { row(t); add_kept(); }
    }
#pragma unroll
    for (int k = 0; k < V; ++k)
      if (!isfinite(A[k])) kept[k] = __int_as_float(0x7fc00000);
    T* o = out + col;
    if (full) {
      *reinterpret_cast<uint4*>(o) = pack<T>(kept);
    } else {
      for (int k = 0; k < V && col + k < P; ++k) o[k] = from_float<T>(kept[k]);
    }
  }
}

}  // namespace
}  // namespace mtlfast

extern "C" int mtlfast_cuda_graddrop(const void* G, int dtype, int64_t T, int64_t P, int64_t ld,
                                     uint64_t seed, void* out, void* stream) {
  using namespace mtlfast;
  if (T <= 0 || T > (1 << 30) || P <= 0) return static_cast<int>(cudaErrorInvalidValue);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const uint32_t key = seed_key(seed);
  MTLFAST_DISPATCH_DTYPE(dtype, {
    constexpr int V = Vec<scalar_t>::kLanes;
    const bool vec = rows_aligned16(G, ld, sizeof(scalar_t)) &&
                     reinterpret_cast<uintptr_t>(out) % 16 == 0;
    const auto* g = static_cast<const scalar_t*>(G);
    auto* o = static_cast<scalar_t*>(out);
    const int64_t need = (P + (int64_t)kThreads * V - 1) / ((int64_t)kThreads * V);
    if (T <= kRegRows) {
      int64_t blocks = need;
      const int wave = one_wave_blocks(graddrop_kernel<scalar_t, kRegRows>, kThreads);
      if (wave > 0 && blocks > wave) blocks = wave;
      graddrop_kernel<scalar_t, kRegRows><<<static_cast<unsigned>(blocks), kThreads, 0, s>>>(
          g, static_cast<int>(T), P, ld, key, o, vec);
    } else {
      int64_t blocks = need;
      const int wave = one_wave_blocks(graddrop_kernel<scalar_t, 0>, kThreads);
      if (wave > 0 && blocks > wave) blocks = wave;
      graddrop_kernel<scalar_t, 0><<<static_cast<unsigned>(blocks), kThreads, 0, s>>>(
          g, static_cast<int>(T), P, ld, key, o, vec);
    }
  });
  return static_cast<int>(cudaGetLastError());
}
