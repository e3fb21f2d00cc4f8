// The logits of grouped gates on the CPU (PLE's levels past the first), forward and backward:
// gate g reads its own input x[skip + g] (M, K) and owns the logit columns [off_g, off_g + n_g):
//   logits[m, off_g + j] = <w_g[j], x[skip + g, m]> + b[off_g + j].
//
// One pass over the rows: a row's gates are N * K multiply-adds (PLE: 2 columns per task gate)
// against weights that stay in L1. As GEMMs they are G products of a few columns each (batched
// GEMMs far from the FMA peak) or one dense GEMM against the block-diagonal weight, G times
// the useful work, whose input gradient (inner dimension N = 16) ran at 4 GB/s: the gate GEMMs
// took 1.4 ms of the 22 ms PLE 64-32 step.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

#include "rows.h"

namespace mtlfast {
namespace {

using at::Tensor;

struct Layout {
  std::vector<int64_t> off, iota;  // off: G + 1 column offsets; iota: 0..max(n)-1
  int64_t G = 0, N = 0, K = 0, skip = 0;
};

Layout layout_of(const Tensor& x, const Tensor& w, at::IntArrayRef sizes, int64_t skip) {
  Layout lay;
  lay.G = static_cast<int64_t>(sizes.size());
  lay.skip = skip;
  TORCH_CHECK(lay.G >= 1 && skip >= 0, "gate_logits_cpu: at least one gate, skip >= 0");
  TORCH_CHECK(x.dim() == 3 && x.size(0) == skip + lay.G,
              "gate_logits_cpu: x must be (skip + G, M, K)");
  TORCH_CHECK((x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble) &&
                  w.scalar_type() == x.scalar_type() && x.device().is_cpu() && w.device().is_cpu(),
              "gate_logits_cpu: x and weight must be float32 or float64 CPU tensors of one dtype");
  lay.K = x.size(2);
  lay.off.push_back(0);
  int64_t widest = 0;
  for (int64_t n : sizes) {
    TORCH_CHECK(n >= 1, "gate_logits_cpu: every gate needs at least one column");
    lay.off.push_back(lay.off.back() + n);
    widest = std::max(widest, n);
  }
  lay.N = lay.off.back();
  TORCH_CHECK(w.numel() == lay.N * lay.K, "gate_logits_cpu: weight must hold N x K entries");
  lay.iota = strided(widest, 1);
  return lay;
}

// x with its last dimension contiguous (the dot products and axpys run over it)
Tensor unit_last(const Tensor& t) { return t.stride(2) == 1 ? t : t.contiguous(); }

template <typename T>
MTLFAST_CLONES void forward_rows(const T* xp, int64_t xg, int64_t xm, const T* wp, const T* bp,
                                 T* lp, const Layout& lay, int64_t begin, int64_t end) {
  const int64_t K = lay.K;
  const int64_t* idx = lay.iota.data();
  for (int64_t m = begin; m < end; ++m) {
    T* out = lp + m * lay.N;
    for (int64_t g = 0; g < lay.G; ++g) {
      const T* x = xp + (lay.skip + g) * xg + m * xm;
      const int64_t a = lay.off[g], e = lay.off[g + 1];
      int64_t j = a;
      for (; j + 4 <= e; j += 4) dots_gather<T, 4>(out + j, x, wp + j * K, idx, K, K);
      for (; j < e; ++j) dots_gather<T, 1>(out + j, x, wp + j * K, idx, K, K);
    }
    if (bp)
      for (int64_t j = 0; j < lay.N; ++j) out[j] += bp[j];
  }
}

// Rows [begin, end) of dx (contiguous (skip + G, M, K)): dx[skip + g, m] = dl[m, cols_g] w_g.
template <typename T>
MTLFAST_CLONES void input_grad_rows(const T* dlp, const T* wp, T* dxp, int64_t M,
                                    const Layout& lay, int64_t begin, int64_t end) {
  const int64_t K = lay.K;
  const int64_t* idx = lay.iota.data();
  for (int64_t m = begin; m < end; ++m)
    for (int64_t g = 0; g < lay.G; ++g) {
      const int64_t a = lay.off[g];
      axpy_gather(dxp + ((lay.skip + g) * M + m) * K, dlp + m * lay.N + a, idx, wp + a * K, idx,
                  K, lay.off[g + 1] - a, K);
    }
}

// dw[j, k0 : k0 + KV * W] for the JB columns j0.. of one gate: sum over the rows m of
// dl[m, j] x[m, k0 :], the JB x KV vectors summed in registers over all M rows.
template <typename T, int JB, int KV>
MTLFAST_INLINE void weight_grad_tile(const T* dl, int64_t N, const T* x, int64_t xm, T* dw,
                                     int64_t K, int64_t M) {
  using V = typename Vec<T>::type;
  constexpr int W = Vec<T>::lanes;
  V acc[JB][KV] = {};
  for (int64_t m = 0; m < M; ++m) {
    V xv[KV];
    for (int v = 0; v < KV; ++v) xv[v] = vload(x + m * xm + v * W);
    for (int j = 0; j < JB; ++j) {
      const T c = dl[m * N + j];
      for (int v = 0; v < KV; ++v) acc[j][v] += c * xv[v];
    }
  }
  for (int j = 0; j < JB; ++j)
    for (int v = 0; v < KV; ++v) vstore(dw + j * K + v * W, acc[j][v]);
}

template <typename T, int JB>
MTLFAST_INLINE void weight_grad_columns(const T* dl, int64_t N, const T* x, int64_t xm, T* dw,
                                        int64_t K, int64_t M) {
  constexpr int W = Vec<T>::lanes;
  int64_t k = 0;
  for (; k + 2 * W <= K; k += 2 * W) weight_grad_tile<T, JB, 2>(dl, N, x + k, xm, dw + k, K, M);
  for (; k + W <= K; k += W) weight_grad_tile<T, JB, 1>(dl, N, x + k, xm, dw + k, K, M);
  for (; k < K; ++k)
    for (int j = 0; j < JB; ++j) {
      T acc = 0;
      for (int64_t m = 0; m < M; ++m) acc += dl[m * N + j] * x[m * xm + k];
      dw[j * K + k] = acc;
    }
}

// dw_g = dl[:, cols_g]^T x[skip + g] for gates [begin, end): each gate's columns four at a
// time, accumulated in registers over the rows (deterministic: no partial sums to combine).
template <typename T>
MTLFAST_CLONES void weight_grad_gates(const T* dlp, const T* xp, int64_t xg, int64_t xm,
                                      T* dwp, int64_t M, const Layout& lay, int64_t begin,
                                      int64_t end) {
  const int64_t K = lay.K, N = lay.N;
  for (int64_t g = begin; g < end; ++g) {
    const T* x = xp + (lay.skip + g) * xg;
    int64_t j = lay.off[g];
    for (; j + 4 <= lay.off[g + 1]; j += 4)
      weight_grad_columns<T, 4>(dlp + j, N, x, xm, dwp + j * K, K, M);
    switch (lay.off[g + 1] - j) {
      case 3: weight_grad_columns<T, 3>(dlp + j, N, x, xm, dwp + j * K, K, M); break;
      case 2: weight_grad_columns<T, 2>(dlp + j, N, x, xm, dwp + j * K, K, M); break;
      case 1: weight_grad_columns<T, 1>(dlp + j, N, x, xm, dwp + j * K, K, M); break;
      default: break;
    }
  }
}

Tensor gate_logits_cpu(const Tensor& x_in, const Tensor& w_in, const std::optional<Tensor>& b,
                       at::IntArrayRef sizes, int64_t skip) {
  const Tensor x = unit_last(x_in), w = w_in.contiguous();
  const Layout lay = layout_of(x, w, sizes, skip);
  const int64_t M = x.size(1);
  Tensor bc;
  if (b.has_value() && b->defined()) {
    TORCH_CHECK(b->numel() == lay.N && b->scalar_type() == x.scalar_type(),
                "gate_logits_cpu: bias must hold N entries of x's dtype");
    bc = b->contiguous();
  }
  Tensor logits = at::empty({M, lay.N}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "gate_logits_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    const scalar_t* bp = bc.defined() ? bc.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* lp = logits.data_ptr<scalar_t>();
    at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
      forward_rows<scalar_t>(xp, x.stride(0), x.stride(1), wp, bp, lp, lay, begin, end);
    });
  });
  return logits;
}

// Returns dx ((skip + G, M, K) contiguous, the skipped inputs' rows zero), dweight (flat, as
// weight) and dbias (N); a gradient not asked for is an empty tensor.
std::tuple<Tensor, Tensor, Tensor> gate_logits_backward_cpu(
    const Tensor& dl_in, const Tensor& x_in, const Tensor& w_in, at::IntArrayRef sizes,
    int64_t skip, bool need_x, bool need_w, bool need_b) {
  const Tensor x = unit_last(x_in), w = w_in.contiguous(), dl = dl_in.contiguous();
  const Layout lay = layout_of(x, w, sizes, skip);
  const int64_t M = x.size(1), K = lay.K;
  TORCH_CHECK(dl.dim() == 2 && dl.size(0) == M && dl.size(1) == lay.N &&
                  dl.scalar_type() == x.scalar_type(),
              "gate_logits_backward_cpu: dlogits must be (M, N) of x's dtype");
  Tensor dx = at::empty(need_x ? at::IntArrayRef{x.size(0), M, K} : at::IntArrayRef{0},
                        x.options());
  Tensor dw = at::empty(need_w ? at::IntArrayRef{lay.N * K} : at::IntArrayRef{0}, x.options());
  if (need_x && skip > 0) dx.narrow(0, 0, skip).zero_();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "gate_logits_backward_cpu", [&] {
    const scalar_t* dlp = dl.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    if (need_x) {
      scalar_t* dxp = dx.data_ptr<scalar_t>();
      const scalar_t* wp = w.const_data_ptr<scalar_t>();
      at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
        input_grad_rows<scalar_t>(dlp, wp, dxp, M, lay, begin, end);
      });
    }
    if (need_w) {
      scalar_t* dwp = dw.data_ptr<scalar_t>();
      at::parallel_for(0, lay.G, 1, [&](int64_t begin, int64_t end) {
        weight_grad_gates<scalar_t>(dlp, xp, x.stride(0), x.stride(1), dwp, M, lay, begin, end);
      });
    }
  });
  return {dx, dw, need_b ? dl.sum(0) : at::empty({0}, x.options())};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mtlfast, m) {
  m.def("gate_logits_cpu(Tensor x, Tensor weight, Tensor? bias, int[] sizes, int skip) "
        "-> Tensor");
  m.def("gate_logits_backward_cpu(Tensor dlogits, Tensor x, Tensor weight, int[] sizes, "
        "int skip, bool need_x, bool need_weight, bool need_bias) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(mtlfast, CPU, m) {
  m.impl("gate_logits_cpu", &gate_logits_cpu);
  m.impl("gate_logits_backward_cpu", &gate_logits_backward_cpu);
}

}  // namespace mtlfast
