// Row kernels shared by the CPU ops that work one row of a batch at a time from cache (the
// mixtures, the grouped gates): gathered axpys and dot products over index lists.
#pragma once
#include <cstdint>
#include <vector>

#include "simd.h"

namespace mtlfast {

// out[0:D] = sum_j w[widx[j]] rows[ridx[j]][0:D] (rows: base + ridx * rstride), four vectors
// of out at a time (four independent FMA chains: one accumulator per vector left the loop
// waiting on FMA latency, 2x slower). The index lists give both mixtures' access patterns:
// strided (every gate over every expert) and gathered (a gate's own experts).
template <typename T>
MTLFAST_INLINE void axpy_gather(T* out, const T* w, const int64_t* widx, const T* base,
                                const int64_t* ridx, int64_t rstride, int64_t n, int64_t D) {
  using V = typename Vec<T>::type;
  constexpr int W = Vec<T>::lanes;
  int64_t d = 0;
  for (; d + 4 * W <= D; d += 4 * W) {
    V a0 = V{}, a1 = V{}, a2 = V{}, a3 = V{};
    for (int64_t j = 0; j < n; ++j) {
      const T wj = w[widx[j]];
      const T* r = base + ridx[j] * rstride + d;
      a0 += wj * vload(r);
      a1 += wj * vload(r + W);
      a2 += wj * vload(r + 2 * W);
      a3 += wj * vload(r + 3 * W);
    }
    vstore(out + d, a0);
    vstore(out + d + W, a1);
    vstore(out + d + 2 * W, a2);
    vstore(out + d + 3 * W, a3);
  }
  for (; d + W <= D; d += W) {
    V acc = V{};
    for (int64_t j = 0; j < n; ++j) acc += w[widx[j]] * vload(base + ridx[j] * rstride + d);
    vstore(out + d, acc);
  }
  for (; d < D; ++d) {
    T acc = 0;
    for (int64_t j = 0; j < n; ++j) acc += w[widx[j]] * base[ridx[j] * rstride + d];
    out[d] = acc;
  }
}

// out[i] = <z, rows[idx[i]]> for i < N (N <= 4): one pass over z for four dot products.
template <typename T, int N>
MTLFAST_INLINE void dots_gather(T* out, const T* z, const T* base, const int64_t* idx,
                                int64_t rstride, int64_t D) {
  using V = typename Vec<T>::type;
  constexpr int W = Vec<T>::lanes;
  const T* rows[N];
  V acc[N];
  for (int i = 0; i < N; ++i) {
    rows[i] = base + idx[i] * rstride;
    acc[i] = V{};
  }
  int64_t d = 0;
  for (; d + W <= D; d += W) {
    const V zv = vload(z + d);
    for (int i = 0; i < N; ++i) acc[i] += zv * vload(rows[i] + d);
  }
  for (int i = 0; i < N; ++i) {
    T tail = 0;
    for (int64_t t = d; t < D; ++t) tail += z[t] * rows[i][t];
    out[i] = static_cast<T>(hsum<T>(acc[i])) + tail;
  }
}

// 0, step, 2 step, ... (n of them): the index list of a strided access
inline std::vector<int64_t> strided(int64_t n, int64_t step) {
  std::vector<int64_t> v(n);
  for (int64_t i = 0; i < n; ++i) v[i] = i * step;
  return v;
}

}  // namespace mtlfast
