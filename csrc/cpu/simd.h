// Portable SIMD helpers for the CPU kernels: GCC/Clang vector extensions, so one source
// compiles to AVX2+FMA (through target_clones on the hot functions) and to SSE2 elsewhere.
#pragma once
#include <cstdint>

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define MTLFAST_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define MTLFAST_CLONES
#endif
#define MTLFAST_INLINE inline __attribute__((always_inline))

namespace mtlfast {

template <typename T> struct Vec;
template <> struct Vec<float> {
  // aligned(4): element alignment only, so dereferencing a row pointer is an unaligned load.
  typedef float type __attribute__((vector_size(32), aligned(4)));
  static constexpr int lanes = 8;
};
template <> struct Vec<double> {
  typedef double type __attribute__((vector_size(32), aligned(8)));
  static constexpr int lanes = 4;
};

template <typename T>
MTLFAST_INLINE typename Vec<T>::type vload(const T* p) {
  return *reinterpret_cast<const typename Vec<T>::type*>(p);
}
template <typename T>
MTLFAST_INLINE void vstore(T* p, typename Vec<T>::type v) {
  *reinterpret_cast<typename Vec<T>::type*>(p) = v;
}
// Pairwise tree over the lanes in T's precision: a few shuffles, not one conversion per lane.
template <typename T>
MTLFAST_INLINE double hsum(typename Vec<T>::type v) {
  T a[Vec<T>::lanes];
  for (int l = 0; l < Vec<T>::lanes; ++l) a[l] = v[l];
  for (int w = Vec<T>::lanes / 2; w > 0; w /= 2)
    for (int l = 0; l < w; ++l) a[l] += a[l + w];
  return static_cast<double>(a[0]);
}

}  // namespace mtlfast
