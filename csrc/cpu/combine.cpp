// out = scale * (w @ G) (+ out when accumulating): one pass over G, column blocks that stay
// in L1 while the T rows stream through, parallel over blocks. Writing straight into a
// flat .grad buffer is the point: no temporary of size P.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "simd.h"

namespace mtlfast {
namespace {

template <typename T>
MTLFAST_CLONES void combine_block(const T* w, const T* G, int64_t ld, int64_t nT, int64_t n,
                                  T* out, bool accumulate, T scale) {
  using V = typename Vec<T>::type;
  constexpr int W = Vec<T>::lanes;
  constexpr int64_t kB = 256;
  T buf[kB];
  for (int64_t b0 = 0; b0 < n; b0 += kB) {
    const int64_t nb = std::min(kB, n - b0);
    for (int64_t c = 0; c < nb; ++c) buf[c] = 0;
    for (int64_t t = 0; t < nT; ++t) {
      const T wt = w[t];
      const T* row = G + t * ld + b0;
      int64_t c = 0;
      for (; c + W <= nb; c += W) vstore(buf + c, vload(buf + c) + wt * vload(row + c));
      for (; c < nb; ++c) buf[c] += wt * row[c];
    }
    T* o = out + b0;
    if (accumulate) {
      for (int64_t c = 0; c < nb; ++c) o[c] += scale * buf[c];
    } else {
      for (int64_t c = 0; c < nb; ++c) o[c] = scale * buf[c];
    }
  }
}

void combine_cpu(const at::Tensor& w_in, const at::Tensor& G_in, at::Tensor& out,
                 bool accumulate, double scale, const std::optional<at::Tensor>& scale_tensor) {
  TORCH_CHECK(G_in.dim() == 2, "combine: G must be 2-D (T, P), got ", G_in.dim(), " dims");
  TORCH_CHECK(w_in.dim() == 1 && w_in.size(0) == G_in.size(0),
              "combine: w must be 1-D of length T=", G_in.size(0), ", got ", w_in.sizes());
  TORCH_CHECK(out.dim() == 1 && out.size(0) == G_in.size(1) && out.is_contiguous(),
              "combine: out must be a contiguous 1-D tensor of length P=", G_in.size(1));
  TORCH_CHECK(out.scalar_type() == G_in.scalar_type(), "combine: out dtype ", out.scalar_type(),
              " differs from G dtype ", G_in.scalar_type());
  TORCH_CHECK(G_in.scalar_type() == at::kFloat || G_in.scalar_type() == at::kDouble,
              "combine (C++ CPU): float32/float64 only, got ", G_in.scalar_type());
  at::Tensor G = (G_in.stride(1) == 1) ? G_in : G_in.contiguous();
  TORCH_CHECK(!scale_tensor || scale_tensor->numel() == 1,
              "combine: scale_tensor must hold one element, got ", scale_tensor->numel());
  // A tensor scale folds into w (a CPU tensor: reading it costs no device sync).
  at::Tensor w = scale_tensor ? (w_in.to(at::kDouble) * scale_tensor->to(at::kCPU, at::kDouble)
                                                          .reshape({}))
                                    .to(G.scalar_type())
                                    .contiguous()
                              : w_in.to(G.scalar_type()).contiguous();
  const int64_t nT = G.size(0), P = G.size(1);
  AT_DISPATCH_FLOATING_TYPES(G.scalar_type(), "combine_cpu", [&] {
    const scalar_t* wp = w.data_ptr<scalar_t>();
    const scalar_t* gp = G.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t ld = G.stride(0);
    at::parallel_for(0, P, 16384, [&](int64_t b, int64_t e) {
      combine_block<scalar_t>(wp, gp + b, ld, nT, e - b, op + b, accumulate,
                              static_cast<scalar_t>(scale));
    });
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mtlfast, m) {
  m.def(
      "combine_(Tensor w, Tensor G, Tensor(a!) out, bool accumulate, float scale, "
      "Tensor? scale_tensor=None) -> ()");
}
TORCH_LIBRARY_IMPL(mtlfast, CPU, m) { m.impl("combine_", &combine_cpu); }

}  // namespace mtlfast
