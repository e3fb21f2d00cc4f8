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

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include "rows.h"
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

// dz (T, B, D) as a view of a row-major (B, T, D) copy when the T rows of one b would share
// L1 sets: rows a multiple of 4 KB apart map to one set, and 16 or more of them thrash an
// 8-way L1 as the backward reads them once per expert (40 gates at B=256, D=64: 0.86 ->
// 0.53 ms with the copy). With 8 rows the copy costs more than it saves.
Tensor spread_rows(const Tensor& dz) {
  const int64_t bytes = dz.stride(0) * static_cast<int64_t>(dz.element_size());
  if (dz.size(0) < 16 || dz.stride(0) <= dz.stride(1) || bytes % 4096 != 0) return dz;
  return dz.transpose(0, 1).contiguous().transpose(0, 1);
}

struct Strides {
  int64_t gt, gb, ge, he, hb, zt, zb;
};

template <typename T>
MTLFAST_CLONES void forward_rows(const T* gp, const T* hp, T* zp, Strides s, int64_t T_,
                                 int64_t E, int64_t D, int64_t begin, int64_t end) {
  const std::vector<int64_t> ge = strided(E, s.ge), experts = strided(E, 1);
  for (int64_t b = begin; b < end; ++b)
    for (int64_t t = 0; t < T_; ++t)  // z: (B, T, D) contiguous
      axpy_gather(zp + (b * T_ + t) * D, gp + t * s.gt + b * s.gb, ge.data(), hp + b * s.hb,
                  experts.data(), s.he, E, D);
}

template <typename T>
MTLFAST_CLONES void backward_rows(const T* zp, const T* gp, const T* hp, T* dgp, T* dhp,
                                  Strides s, int64_t T_, int64_t E, int64_t D, int64_t begin,
                                  int64_t end) {
  const std::vector<int64_t> experts = strided(E, 1), gt = strided(T_, s.gt),
                             tasks = strided(T_, 1);
  for (int64_t b = begin; b < end; ++b) {
    if (dgp) {  // (B, T, E) contiguous
      for (int64_t t = 0; t < T_; ++t) {
        const T* z = zp + t * s.zt + b * s.zb;
        T* out = dgp + (b * T_ + t) * E;
        const T* h = hp + b * s.hb;
        int64_t e = 0;
        for (; e + 4 <= E; e += 4) dots_gather<T, 4>(out + e, z, h, experts.data() + e, s.he, D);
        for (; e < E; ++e) dots_gather<T, 1>(out + e, z, h, experts.data() + e, s.he, D);
      }
    }
    if (dhp) {  // (B, E, D) contiguous: dh[e, b] = sum_t g[t, b, e] dz[t, b]
      for (int64_t e = 0; e < E; ++e)
        axpy_gather(dhp + (b * E + e) * D, gp + b * s.gb + e * s.ge, gt.data(), zp + b * s.zb,
                    tasks.data(), s.zt, T_, D);
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
  const Tensor h = unit_last(h_in), dz = spread_rows(unit_last(dz_in));
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

// ---------------------------------------------------------------------------- gated mixture
// Softmax gates and their mixture in one pass over the rows: gate g owns the logit columns
// [off_g, off_g + n_g), column j weighs expert experts[j], and
//   p[b, j] = softmax over gate g's columns of logits[b],  z[g, b] = sum_j p[b, j] h[experts[j], b].
// Gates that mix a few of the experts (CGC, PLE: 2 of 9) read only those, and the
// probabilities never leave the row: the unfused path scatters the logits into a (B, G, E)
// tensor of -inf, runs the softmax over all of it and mixes every expert.

struct Gates {
  // off: G + 1 column offsets; expert: each column's expert; iota: 0..N-1. By expert (for
  // dh): eoff: E + 1 offsets into ecol (the expert's columns) and egate (their gates).
  std::vector<int64_t> off, expert, iota, eoff, ecol, egate;
  int64_t G = 0, N = 0;
};

Gates gates_of(const Tensor& experts, at::IntArrayRef sizes, int64_t E) {
  TORCH_CHECK(experts.dim() == 1 && experts.scalar_type() == at::kLong && experts.device().is_cpu(),
              "gated_mixture_cpu: experts must be a 1-d int64 CPU tensor");
  Gates gs;
  gs.G = static_cast<int64_t>(sizes.size());
  gs.off.push_back(0);
  for (int64_t n : sizes) {
    TORCH_CHECK(n >= 1, "gated_mixture_cpu: every gate needs at least one column");
    gs.off.push_back(gs.off.back() + n);
  }
  gs.N = gs.off.back();
  TORCH_CHECK(experts.numel() == gs.N, "gated_mixture_cpu: one expert index per logit column");
  const Tensor ex = experts.contiguous();
  const int64_t* ep = ex.data_ptr<int64_t>();
  gs.eoff.assign(E + 1, 0);
  for (int64_t j = 0; j < gs.N; ++j) {
    TORCH_CHECK(ep[j] >= 0 && ep[j] < E, "gated_mixture_cpu: expert index out of range");
    gs.expert.push_back(ep[j]);
    gs.iota.push_back(j);
    ++gs.eoff[ep[j] + 1];
  }
  for (int64_t e = 0; e < E; ++e) gs.eoff[e + 1] += gs.eoff[e];
  gs.ecol.resize(gs.N);
  gs.egate.resize(gs.N);
  std::vector<int64_t> next(gs.eoff.begin(), gs.eoff.end() - 1);
  for (int64_t g = 0; g < gs.G; ++g) {
    for (int64_t j = gs.off[g]; j < gs.off[g + 1]; ++j) {
      const int64_t at = next[ep[j]]++;
      gs.ecol[at] = j;
      gs.egate[at] = g;
    }
  }
  return gs;
}

// x[0:n] = exp(x[0:n]) for x <= 0 (softmax's shifted logits). float: eight lanes at a time,
// Cephes' expf (2^k times a degree-7 polynomial on |r| <= ln(2) / 2, ~1 ulp); the scalar
// expf per logit was half of the kernel's forward at MMoE's dense 8 x 8 gates. Inputs below
// -87 give exp(-87) ~ 1.6e-38 instead of a smaller number or 0 (a weight next to >= 1).
// double: std::exp.
MTLFAST_INLINE void exp_nonpositive(float* x, int64_t n) {
  using V = Vec<float>::type;
  typedef int32_t VI __attribute__((vector_size(32), aligned(4)));
  constexpr int W = Vec<float>::lanes;
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    V v = vload(x + i);
    v = v < -87.0f ? V{} - 87.0f : v;
    const V t = v * 1.44269504088896341f;  // x / ln 2, then k = round(x / ln 2)
    VI k = __builtin_convertvector(t + (t < 0.0f ? V{} - 0.5f : V{} + 0.5f), VI);
    const V kf = __builtin_convertvector(k, V);
    const V r = v - kf * 0.693359375f + kf * 2.12194440e-4f;
    V p = V{} + 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const VI bits = (k + 127) << 23;
    V scale;
    __builtin_memcpy(&scale, &bits, sizeof(scale));
    vstore(x + i, p * scale);
  }
  for (; i < n; ++i) x[i] = std::exp(x[i]);
}

MTLFAST_INLINE void exp_nonpositive(double* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = std::exp(x[i]);
}

template <typename T>
MTLFAST_CLONES void gated_forward_rows(const T* lp, int64_t lstride, const T* hp, int64_t he,
                                       int64_t hb, T* pp, T* zp, int64_t zg, int64_t zb,
                                       const Gates& gs, int64_t D, int64_t begin, int64_t end) {
  for (int64_t b = begin; b < end; ++b) {
    const T* l = lp + b * lstride;
    T* p = pp + b * gs.N;
    for (int64_t g = 0; g < gs.G; ++g) {  // p = logits - the gate's max
      const int64_t a = gs.off[g], n = gs.off[g + 1] - a;
      T m = l[a];
      for (int64_t j = 1; j < n; ++j) m = std::max(m, l[a + j]);
      for (int64_t j = 0; j < n; ++j) p[a + j] = l[a + j] - m;
    }
    exp_nonpositive(p, gs.N);  // the whole row's gates at once
    for (int64_t g = 0; g < gs.G; ++g) {
      const int64_t a = gs.off[g], n = gs.off[g + 1] - a;
      T s = 0;
      for (int64_t j = 0; j < n; ++j) s += p[a + j];
      const T inv = T(1) / s;
      for (int64_t j = 0; j < n; ++j) p[a + j] *= inv;
      axpy_gather(zp + g * zg + b * zb, p, gs.iota.data() + a, hp + b * hb,
                  gs.expert.data() + a, he, n, D);
    }
  }
}

template <typename T>
MTLFAST_CLONES void gated_backward_rows(const T* zp, int64_t zt, int64_t zb, const T* pp,
                                        const T* hp, int64_t he, int64_t hb, T* dlp, T* dhp,
                                        const Gates& gs, int64_t E, int64_t B, int64_t D,
                                        int64_t begin, int64_t end) {
  std::vector<T> dp(gs.N);
  const int64_t* ex = gs.expert.data();
  for (int64_t b = begin; b < end; ++b) {
    const T* p = pp + b * gs.N;
    const T* h = hp + b * hb;
    if (dlp) {  // dl = p * (dp - <p, dp>), dp[j] = <dz[g], h[experts[j]]>
      T* dl = dlp + b * gs.N;
      for (int64_t g = 0; g < gs.G; ++g) {
        const T* dz = zp + g * zt + b * zb;
        const int64_t a = gs.off[g], e = gs.off[g + 1];
        int64_t j = a;
        for (; j + 4 <= e; j += 4) dots_gather<T, 4>(&dp[j], dz, h, ex + j, he, D);
        for (; j < e; ++j) dots_gather<T, 1>(&dp[j], dz, h, ex + j, he, D);
        T s = 0;
        for (j = a; j < e; ++j) s += p[j] * dp[j];
        for (j = a; j < e; ++j) dl[j] = p[j] * (dp[j] - s);
      }
    }
    if (dhp) {  // dh[e] = sum over expert e's columns j of p[j] dz[g(j)], written once
      for (int64_t e = 0; e < E; ++e) {
        const int64_t a = gs.eoff[e];
        axpy_gather(dhp + (e * B + b) * D, p, gs.ecol.data() + a, zp + b * zb,
                    gs.egate.data() + a, zt, gs.eoff[e + 1] - a, D);
      }
    }
  }
}

void check_gated(const Tensor& l, const Tensor& h) {
  TORCH_CHECK(l.dim() == 2 && h.dim() == 3 && h.size(1) == l.size(0),
              "gated_mixture_cpu: logits must be (B, N) and h (E, B, D)");
  TORCH_CHECK(l.scalar_type() == h.scalar_type() &&
                  (l.scalar_type() == at::kFloat || l.scalar_type() == at::kDouble),
              "gated_mixture_cpu: logits and h must both be float32 or both float64");
  TORCH_CHECK(l.device().is_cpu() && h.device().is_cpu(), "gated_mixture_cpu: CPU tensors only");
}

// Returns z (G, B, D) and the probabilities p (B, N). z is contiguous (gate-major) with
// gate_major, else a view of a (B, G, D) buffer: the layout of a PLE inner level's mixture,
// which the next level's gates read as one (B, G * D) matrix. Gate-major suits the consumers
// of a block's output (per-task heads and losses: a loop definition's torch.stack is
// contiguous too, and elementwise ops across the two layouts ran 3-4x slower).
std::tuple<Tensor, Tensor> gated_mixture_cpu(const Tensor& logits_in, const Tensor& h_in,
                                             const Tensor& experts, at::IntArrayRef sizes,
                                             bool gate_major) {
  check_gated(logits_in, h_in);
  const Tensor l = logits_in.stride(1) == 1 ? logits_in : logits_in.contiguous();
  const Tensor h = unit_last(h_in);
  const Gates gs = gates_of(experts, sizes, h.size(0));
  TORCH_CHECK(l.size(1) == gs.N, "gated_mixture_cpu: logits must have one column per gate entry");
  const int64_t B = l.size(0), D = h.size(2);
  Tensor z = gate_major ? at::empty({gs.G, B, D}, h.options())
                        : at::empty({B, gs.G, D}, h.options()).transpose(0, 1);
  Tensor p = at::empty({B, gs.N}, h.options());
  AT_DISPATCH_FLOATING_TYPES(l.scalar_type(), "gated_mixture_cpu", [&] {
    const scalar_t* lp = l.data_ptr<scalar_t>();
    const scalar_t* hp = h.data_ptr<scalar_t>();
    scalar_t* pp = p.data_ptr<scalar_t>();
    scalar_t* zp = z.data_ptr<scalar_t>();
    at::parallel_for(0, B, kGrain, [&](int64_t begin, int64_t end) {
      gated_forward_rows<scalar_t>(lp, l.stride(0), hp, h.stride(0), h.stride(1), pp, zp,
                                   z.stride(0), z.stride(1), gs, D, begin, end);
    });
  });
  return {z, p};
}

// Returns dlogits (B, N) and dh (E, B, D), contiguous (empty when not asked).
std::tuple<Tensor, Tensor> gated_mixture_backward_cpu(const Tensor& dz_in, const Tensor& p,
                                                      const Tensor& h_in, const Tensor& experts,
                                                      at::IntArrayRef sizes, bool need_logits,
                                                      bool need_h) {
  check_gated(p, h_in);
  TORCH_CHECK(p.is_contiguous(), "gated_mixture_backward_cpu: p must be contiguous");
  const Tensor h = unit_last(h_in), dz = spread_rows(unit_last(dz_in));
  const int64_t B = p.size(0), E = h.size(0), D = h.size(2);
  const Gates gs = gates_of(experts, sizes, E);
  TORCH_CHECK(p.size(1) == gs.N && dz.dim() == 3 && dz.size(0) == gs.G && dz.size(1) == B &&
                  dz.size(2) == D && dz.scalar_type() == p.scalar_type(),
              "gated_mixture_backward_cpu: dz must be (G, B, D) and p (B, N) of h's dtype");
  Tensor dl = at::empty(need_logits ? at::IntArrayRef{B, gs.N} : at::IntArrayRef{0}, p.options());
  // dh expert-major: the experts' backward reads one expert's (B, D) slice at a time
  Tensor dh = at::empty(need_h ? at::IntArrayRef{E, B, D} : at::IntArrayRef{0}, h.options());
  AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "gated_mixture_backward_cpu", [&] {
    scalar_t* dlp = need_logits ? dl.data_ptr<scalar_t>() : nullptr;
    scalar_t* dhp = need_h ? dh.data_ptr<scalar_t>() : nullptr;
    const scalar_t* zp = dz.data_ptr<scalar_t>();
    const scalar_t* pp = p.data_ptr<scalar_t>();
    const scalar_t* hp = h.data_ptr<scalar_t>();
    at::parallel_for(0, B, kGrain, [&](int64_t begin, int64_t end) {
      gated_backward_rows<scalar_t>(zp, dz.stride(0), dz.stride(1), pp, hp, h.stride(0),
                                    h.stride(1), dlp, dhp, gs, E, B, D, begin, end);
    });
  });
  return {dl, dh};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mtlfast, m) {
  m.def("mixture_cpu(Tensor g, Tensor h) -> Tensor");
  m.def("mixture_backward_cpu(Tensor dz, Tensor g, Tensor h, bool need_g, bool need_h) "
        "-> (Tensor, Tensor)");
  m.def("gated_mixture_cpu(Tensor logits, Tensor h, Tensor experts, int[] sizes, "
        "bool gate_major) -> (Tensor, Tensor)");
  m.def("gated_mixture_backward_cpu(Tensor dz, Tensor p, Tensor h, Tensor experts, int[] sizes, "
        "bool need_logits, bool need_h) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(mtlfast, CPU, m) {
  m.impl("mixture_cpu", &mixture_cpu);
  m.impl("mixture_backward_cpu", &mixture_backward_cpu);
  m.impl("gated_mixture_cpu", &gated_mixture_cpu);
  m.impl("gated_mixture_backward_cpu", &gated_mixture_backward_cpu);
}

}  // namespace mtlfast
