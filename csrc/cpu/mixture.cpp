// The per-task mixture of experts on the CPU: z[t, b] = sum_e g[t, b, e] h[e, b], and its
// gradients dg[t, b, e] = <dz[t, b], h[e, b]>, dh[e, b] = sum_t g[t, b, e] dz[t, b].
//
// One pass over the rows b: row b's T x E gate weights and E x D expert outputs are a few KB,
// so each row is read once and all T outputs (or both gradients) come from cache. torch's
// batched (T, E) @ (E, D) products per row (the bmm path) cost 3-10x the memory traffic at the
// expert blocks' sizes. Outputs are buffers in row-major (B, ., .) order returned as
// transposed views, the layout of the bmm path.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <tuple>

#include "simd.h"

namespace mtlfast {
namespace {

using at::Tensor;

constexpr int64_t kGrain = 16;  // rows per task of at::parallel_for

void check(const Tensor& g, const Tensor& h) {
  TORCH_CHECK(g.dim() == 3 && h.dim() == 3 && h.size(0) == g.size(2) && h.size(1) == g.size(1),
              "mixture_cpu: g must be (T, B, E) and h (E, B, D)");
  TORCH_CHECK(g.scalar_type() == h.scalar_type() &&
                  (g.scalar_type() == at::kFloat || g.scalar_type() == at::kDouble),
              "mixture_cpu: g and h must both be float32 or both float64");
  TORCH_CHECK(g.device().is_cpu() && h.device().is_cpu(), "mixture_cpu: CPU tensors only");
}

// h, dz: the last dimension contiguous (the inner loops run over it)
Tensor unit_last(const Tensor& t) { return t.stride(2) == 1 ? t : t.contiguous(); }

// out[0:D] = sum_e w[e] rows[e][0:D], four vectors of out at a time (four independent FMA
// chains: one accumulator per vector left the loop waiting on FMA latency, 2x slower).
template <typename T>
MTLFAST_INLINE void axpy_rows(T* out, const T* w, int64_t wstride, const T* rows,
                              int64_t rstride, int64_t E, int64_t D) {
  using V = typename Vec<T>::type;
  constexpr int W = Vec<T>::lanes;
  int64_t d = 0;
  for (; d + 4 * W <= D; d += 4 * W) {
    V a0 = V{}, a1 = V{}, a2 = V{}, a3 = V{};
    for (int64_t e = 0; e < E; ++e) {
      const T we = w[e * wstride];
      const T* r = rows + e * rstride + d;
      a0 += we * vload(r);
      a1 += we * vload(r + W);
      a2 += we * vload(r + 2 * W);
      a3 += we * vload(r + 3 * W);
    }
    vstore(out + d, a0);
    vstore(out + d + W, a1);
    vstore(out + d + 2 * W, a2);
    vstore(out + d + 3 * W, a3);
  }
  for (; d + W <= D; d += W) {
    V acc = V{};
    for (int64_t e = 0; e < E; ++e) acc += w[e * wstride] * vload(rows + e * rstride + d);
    vstore(out + d, acc);
  }
  for (; d < D; ++d) {
    T acc = 0;
    for (int64_t e = 0; e < E; ++e) acc += w[e * wstride] * rows[e * rstride + d];
    out[d] = acc;
  }
}

// out[e * ostride] = <z, rows[e]> for e < n (n <= 4): one pass over z for four dot products.
template <typename T, int N>
MTLFAST_INLINE void dots(T* out, int64_t ostride, const T* z, const T* rows, int64_t rstride,
                         int64_t D) {
  using V = typename Vec<T>::type;
  constexpr int W = Vec<T>::lanes;
  V acc[N];
  for (int i = 0; i < N; ++i) acc[i] = V{};
  int64_t d = 0;
  for (; d + W <= D; d += W) {
    const V zv = vload(z + d);
    for (int i = 0; i < N; ++i) acc[i] += zv * vload(rows + i * rstride + d);
  }
  for (int i = 0; i < N; ++i) {
    T tail = 0;
    for (int64_t t = d; t < D; ++t) tail += z[t] * rows[i * rstride + t];
    out[i * ostride] = static_cast<T>(hsum<T>(acc[i])) + tail;
  }
}

struct Strides {
  int64_t gt, gb, ge, he, hb, zt, zb;
};

template <typename T>
MTLFAST_CLONES void forward_rows(const T* gp, const T* hp, T* zp, Strides s, int64_t T_,
                                 int64_t E, int64_t D, int64_t begin, int64_t end) {
  for (int64_t b = begin; b < end; ++b)
    for (int64_t t = 0; t < T_; ++t)  // z: (B, T, D) contiguous
      axpy_rows(zp + (b * T_ + t) * D, gp + t * s.gt + b * s.gb, s.ge, hp + b * s.hb, s.he, E,
                D);
}

template <typename T>
MTLFAST_CLONES void backward_rows(const T* zp, const T* gp, const T* hp, T* dgp, T* dhp,
                                  Strides s, int64_t T_, int64_t E, int64_t D, int64_t begin,
                                  int64_t end) {
  for (int64_t b = begin; b < end; ++b) {
    if (dgp) {  // (B, T, E) contiguous
      for (int64_t t = 0; t < T_; ++t) {
        const T* z = zp + t * s.zt + b * s.zb;
        T* out = dgp + (b * T_ + t) * E;
        const T* h = hp + b * s.hb;
        int64_t e = 0;
        for (; e + 4 <= E; e += 4) dots<T, 4>(out + e, 1, z, h + e * s.he, s.he, D);
        for (; e < E; ++e) dots<T, 1>(out + e, 1, z, h + e * s.he, s.he, D);
      }
    }
    if (dhp) {  // (B, E, D) contiguous: dh[e, b] = sum_t g[t, b, e] dz[t, b]
      for (int64_t e = 0; e < E; ++e)
        axpy_rows(dhp + (b * E + e) * D, gp + b * s.gb + e * s.ge, s.gt, zp + b * s.zb, s.zt,
                  T_, D);
    }
  }
}

Tensor mixture_cpu(const Tensor& g, const Tensor& h_in) {
  check(g, h_in);
  const Tensor h = unit_last(h_in);
  const int64_t T = g.size(0), B = g.size(1), D = h.size(2);
  Tensor z = at::empty({B, T, D}, h.options());
  const Strides st{g.stride(0), g.stride(1), g.stride(2), h.stride(0), h.stride(1), 0, 0};
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "mixture_cpu", [&] {
    const scalar_t* gp = g.data_ptr<scalar_t>();
    const scalar_t* hp = h.data_ptr<scalar_t>();
    scalar_t* zp = z.data_ptr<scalar_t>();
    at::parallel_for(0, B, kGrain, [&](int64_t begin, int64_t end) {
      forward_rows<scalar_t>(gp, hp, zp, st, T, g.size(2), D, begin, end);
    });
  });
  return z.transpose(0, 1);
}

std::tuple<Tensor, Tensor> mixture_backward_cpu(const Tensor& dz_in, const Tensor& g,
                                                const Tensor& h_in, bool need_g, bool need_h) {
  check(g, h_in);
  TORCH_CHECK(dz_in.dim() == 3 && dz_in.size(0) == g.size(0) && dz_in.size(1) == g.size(1) &&
                  dz_in.size(2) == h_in.size(2) && dz_in.scalar_type() == g.scalar_type(),
              "mixture_backward_cpu: dz must be (T, B, D) of g's dtype");
  const Tensor h = unit_last(h_in), dz = unit_last(dz_in);
  const int64_t T = g.size(0), B = g.size(1), E = g.size(2), D = h.size(2);
  // a gradient not asked for is an empty tensor
  Tensor dg = at::empty(need_g ? at::IntArrayRef{B, T, E} : at::IntArrayRef{0}, g.options());
  Tensor dh = at::empty(need_h ? at::IntArrayRef{B, E, D} : at::IntArrayRef{0}, h.options());
  const Strides st{g.stride(0), g.stride(1), g.stride(2), h.stride(0), h.stride(1),
                   dz.stride(0), dz.stride(1)};
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "mixture_backward_cpu", [&] {
    scalar_t* dgp = need_g ? dg.data_ptr<scalar_t>() : nullptr;
    scalar_t* dhp = need_h ? dh.data_ptr<scalar_t>() : nullptr;
    const scalar_t* zp = dz.data_ptr<scalar_t>();
    const scalar_t* gp = g.data_ptr<scalar_t>();
    const scalar_t* hp = h.data_ptr<scalar_t>();
    at::parallel_for(0, B, kGrain, [&](int64_t begin, int64_t end) {
      backward_rows<scalar_t>(zp, gp, hp, dgp, dhp, st, T, E, D, begin, end);
    });
  });
  return {need_g ? dg.transpose(0, 1) : dg, need_h ? dh.transpose(0, 1) : dh};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mtlfast, m) {
  m.def("mixture_cpu(Tensor g, Tensor h) -> Tensor");
  m.def("mixture_backward_cpu(Tensor dz, Tensor g, Tensor h, bool need_g, bool need_h) "
        "-> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(mtlfast, CPU, m) {
  m.impl("mixture_cpu", &mixture_cpu);
  m.impl("mixture_backward_cpu", &mixture_backward_cpu);
}

}  // namespace mtlfast
