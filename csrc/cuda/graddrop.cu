// GradDrop (Chen et al. 2020, "Just Pick a Sign") in one pass over G (T, P), with the
// caller's uniform draws u (P) and per-task leaks l (T, or none):
//   S_p = sum_t G[t,p],  pos_p = sum_t max(G[t,p], 0),  abs_p = 2 pos_p - S_p = sum_t |G[t,p]|
//   purity_p = abs_p > 0 ? 0.5 * (1 + S_p / abs_p) : 0.5
//   keep G[t,p] when (purity_p > u_p and G[t,p] > 0) or (purity_p < u_p and G[t,p] < 0)
//   out[p] = sum_t (l_t G[t,p] + (1 - l_t) kept G[t,p]);  NaN when abs_p is not finite.
// The torch reference (mtlfast/ops/graddrop.py) computes the same sums in fp32 through BLAS,
// whose summation order differs: columns whose purity lies within rounding of u_p may pick the
// other sign. T <= 16 keeps a column's values in registers between the two passes; larger T
// reads them again (from L2 for all but huge T).
#include "common.cuh"

namespace mtlfast {
namespace {

constexpr int kThreads = 256;
constexpr int kRegRows = 16;

template <typename T>
__device__ __forceinline__ uint4 load_row(const T* p, bool full, int64_t valid) {
  return full ? __ldg(reinterpret_cast<const uint4*>(p)) : load_vec_scalar(p, valid);
}

template <typename T, int MAXT>  // MAXT > 0: nT <= MAXT rows held in registers
__global__ void __launch_bounds__(kThreads) graddrop_kernel(const T* __restrict__ G, int nT,
                                                            int64_t P, int64_t ld,
                                                            const float* __restrict__ u_all,
                                                            const float* __restrict__ leak,
                                                            T* __restrict__ out, bool vec) {
  constexpr int V = Vec<T>::kLanes;
  constexpr int kRaw = MAXT > 0 ? MAXT : 1;
  for (int64_t col = (blockIdx.x * (int64_t)kThreads + threadIdx.x) * V; col < P;
       col += (int64_t)gridDim.x * kThreads * V) {
    const bool full = vec && col + V <= P;
    const T* g = G + col;
    uint4 raw[kRaw];
    float S[V], pos[V], A[V], kept[V], pur[V], u[V], f[V];
#pragma unroll
    for (int k = 0; k < V; ++k) S[k] = pos[k] = kept[k] = 0.f;
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
        pos[k] = __fadd_rn(pos[k], fmaxf(f[k], 0.f));
      }
    };
    auto add_kept = [&](int t) {
      const float l = leak != nullptr ? __ldg(leak + t) : 0.f;
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const bool keep = (pur[k] > u[k] && f[k] > 0.f) || (pur[k] < u[k] && f[k] < 0.f);
        kept[k] += l * f[k] + (1.f - l) * (keep ? f[k] : 0.f);
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
      A[k] = 2.f * pos[k] - S[k];
      pur[k] = A[k] > 0.f ? 0.5f * (1.0f + S[k] / A[k]) : 0.5f;
      u[k] = col + k < P ? __ldg(u_all + col + k) : 0.f;
    }
    if constexpr (MAXT > 0) {
#pragma unroll
      for (int t = 0; t < MAXT; ++t)
        if (t < nT) { row(t); add_kept(t); }
    } else {
      for (int t = 0; t < nT; ++t) { row(t); add_kept(t); }
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
                                     const float* u, const float* leak, void* out,
                                     void* stream) {
  using namespace mtlfast;
  if (T <= 0 || T > (1 << 30) || P <= 0) return static_cast<int>(cudaErrorInvalidValue);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
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
          g, static_cast<int>(T), P, ld, u, leak, o, vec);
    } else {
      int64_t blocks = need;
      const int wave = one_wave_blocks(graddrop_kernel<scalar_t, 0>, kThreads);
      if (wave > 0 && blocks > wave) blocks = wave;
      graddrop_kernel<scalar_t, 0><<<static_cast<unsigned>(blocks), kThreads, 0, s>>>(
          g, static_cast<int>(T), P, ld, u, leak, o, vec);
    }
  });
  return static_cast<int>(cudaGetLastError());
}
