// An expert bank's MLPs on the CPU, forward and backward, as one op each.
//
// E experts of one shape: layer l of expert e is h_l[e] = act(h_{l-1}[e] W_l[e]^T + b_l[e]),
// h_{-1}[e] the input (shared (M, K), or x[e / per_group] of a (G, M, K) input); act is ReLU
// or the identity. The experts run one after the other, every layer of expert e before the
// next expert, each layer one MKL GEMM (at::mm_out) into the expert's slice of one
// (E, M, H_l) output, the bias and activation added to that slice while it is in cache.
//
// Why not torch.bmm: on x86 torch sends fp32 bmm to oneDNN, measured 1.35x slower than MKL's
// GEMM at the experts' sizes (9 x 2048 x 128 x 256, one thread); and an elementwise pass over
// all E experts at once (ReLU, its backward, the bias sum) walks 10-20 MB that do not stay in
// cache, where one expert's 1-2 MB do: threshold_backward over (9, 2048, 256) took 10 ms in
// the block's step against 9 x 0.2 ms per expert.
//
// Weights: layer l's experts are stored in parts (an expert bank's shared experts apart from
// the others): weights[l * P + p] is part p's flat concatenation of its experts' (out, in)
// row-major blocks, part_sizes[p] experts; biases alike.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <algorithm>
#include <vector>

#include "simd.h"

namespace mtlfast {
namespace {

using at::Tensor;

struct Bank {
  int64_t E = 0, P = 0, depth = 0, per_group = 0;
  std::vector<int64_t> part_of, index_in_part, widths;  // widths[0] = K, then each layer's

  Bank(const Tensor& x, at::TensorList weights, at::TensorList biases,
       at::IntArrayRef part_sizes, int64_t per_group_) : per_group(per_group_) {
    P = static_cast<int64_t>(part_sizes.size());
    TORCH_CHECK(P >= 1, "expert_mlp: part_sizes must name at least one part");
    for (int64_t p = 0; p < P; ++p) {
      TORCH_CHECK(part_sizes[p] >= 1, "expert_mlp: every part needs at least one expert");
      for (int64_t j = 0; j < part_sizes[p]; ++j) {
        part_of.push_back(p);
        index_in_part.push_back(j);
      }
      E += part_sizes[p];
    }
    TORCH_CHECK(!weights.empty() && weights.size() % P == 0 && biases.size() == weights.size(),
                "expert_mlp: weights and biases must hold depth x parts tensors");
    depth = static_cast<int64_t>(weights.size()) / P;
    if (per_group == 0) {
      TORCH_CHECK(x.dim() == 2, "expert_mlp: a shared input must be (M, K)");
    } else {
      TORCH_CHECK(x.dim() == 3 && x.size(0) * per_group == E,
                  "expert_mlp: a grouped input must be (E / per_group, M, K)");
    }
    widths.push_back(x.size(-1));
    for (int64_t l = 0; l < depth; ++l) {
      const int64_t out = biases[l * P].numel() / part_sizes[0];
      for (int64_t p = 0; p < P; ++p) {
        TORCH_CHECK(biases[l * P + p].numel() == out * part_sizes[p] &&
                        weights[l * P + p].numel() == out * widths[l] * part_sizes[p],
                    "expert_mlp: every expert of a layer must have the same shape");
      }
      widths.push_back(out);
    }
  }

  Tensor input(const Tensor& x, int64_t e) const {
    return per_group == 0 ? x : x.select(0, e / per_group);
  }

  Tensor weight(at::TensorList weights, int64_t l, int64_t e) const {
    const int64_t out = widths[l + 1], in = widths[l];
    return weights[l * P + part_of[e]].narrow(0, index_in_part[e] * out * in, out * in)
        .view({out, in});
  }

  Tensor bias(at::TensorList biases, int64_t l, int64_t e) const {
    const int64_t out = widths[l + 1];
    return biases[l * P + part_of[e]].narrow(0, index_in_part[e] * out, out);
  }
};

// out = act(out + b) row by row, in one pass over the GEMM's output while it is in cache:
// addmm_out would first copy the broadcast bias into the fresh (cache-cold) output, a pass
// that cost 1.3 ms of the 22 ms PLE 64-32 step (18 experts x (2048, 64)).
template <typename T>
MTLFAST_CLONES void add_bias_act_rows(T* out, const T* b, int64_t M, int64_t N, bool relu) {
  for (int64_t i = 0; i < M; ++i) {
    T* row = out + i * N;
    if (relu) {
      for (int64_t j = 0; j < N; ++j) row[j] = std::max(row[j] + b[j], T(0));
    } else {
      for (int64_t j = 0; j < N; ++j) row[j] += b[j];
    }
  }
}

void add_bias_act(Tensor& out, const Tensor& b, bool relu) {
  const Tensor bc = b.contiguous();
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "expert_mlp", [&] {
    add_bias_act_rows<scalar_t>(out.data_ptr<scalar_t>(), bc.const_data_ptr<scalar_t>(),
                                out.size(0), out.size(1), relu);
  });
}

std::vector<Tensor> expert_mlp_cpu(const Tensor& x, at::TensorList weights,
                                   at::TensorList biases, at::IntArrayRef part_sizes,
                                   int64_t per_group, bool relu) {
  const Bank bank(x, weights, biases, part_sizes, per_group);
  const int64_t M = x.size(-2);
  std::vector<Tensor> outs;
  for (int64_t l = 0; l < bank.depth; ++l) {
    outs.push_back(at::empty({bank.E, M, bank.widths[l + 1]}, x.options()));
  }
  for (int64_t e = 0; e < bank.E; ++e) {
    Tensor in = bank.input(x, e);
    for (int64_t l = 0; l < bank.depth; ++l) {
      Tensor out = outs[l].select(0, e);
      Tensor b = bank.bias(biases, l, e);
      if (out.scalar_type() == at::kFloat || out.scalar_type() == at::kDouble) {
        at::mm_out(out, in, bank.weight(weights, l, e).t());
        add_bias_act(out, b, relu);
      } else {
        // reduced precision: addmm rounds once, as F.linear does
        at::addmm_out(out, b, in, bank.weight(weights, l, e).t());
        if (relu) out.relu_();
      }
      in = out;
    }
  }
  return outs;
}

// g = carried where out > 0, else 0 (relu; else g is carried) and db = the column sums of g,
// in one pass over the rows (a separate sum over g cost ~0.3 ms of the PLE 64-32 step); rows
// are summed 64 at a time, then added to db (the accuracy of a pairwise sum, not a running
// one over 2048 rows).
template <typename T>
MTLFAST_CLONES void relu_bias_grad_rows(const T* carried, int64_t cstride, const T* out, T* g,
                                        T* db, int64_t M, int64_t N, bool relu) {
  std::vector<T> part(N);
  std::fill(db, db + N, T(0));
  for (int64_t m0 = 0; m0 < M; m0 += 64) {
    std::fill(part.begin(), part.end(), T(0));
    for (int64_t m = m0; m < std::min(M, m0 + 64); ++m) {
      const T* c = carried + m * cstride;
      if (relu) {
        const T* o = out + m * N;
        T* gr = g + m * N;
        for (int64_t k = 0; k < N; ++k) {
          gr[k] = o[k] > T(0) ? c[k] : T(0);
          part[k] += gr[k];
        }
      } else {
        for (int64_t k = 0; k < N; ++k) part[k] += c[k];
      }
    }
    for (int64_t k = 0; k < N; ++k) db[k] += part[k];
  }
}

void relu_bias_grad(Tensor& g, const Tensor& carried, const Tensor& out, Tensor& db, bool relu) {
  const bool rows = carried.stride(1) == 1 && out.is_contiguous() && g.stride(1) == 1 &&
                    (!relu || g.is_contiguous()) && db.is_contiguous();
  if (!rows || (carried.scalar_type() != at::kFloat && carried.scalar_type() != at::kDouble)) {
    if (relu) at::threshold_backward_out(g, carried, out, 0);
    at::sum_out(db, g, {0});
    return;
  }
  AT_DISPATCH_FLOATING_TYPES(carried.scalar_type(), "expert_mlp_backward", [&] {
    relu_bias_grad_rows<scalar_t>(carried.const_data_ptr<scalar_t>(), carried.stride(0),
                                  out.const_data_ptr<scalar_t>(),
                                  relu ? g.data_ptr<scalar_t>() : nullptr,
                                  db.data_ptr<scalar_t>(), carried.size(0), carried.size(1),
                                  relu);
  });
}

// Scratch buffer i (0 or 1) of at least n elements, kept per thread across calls: a fresh
// buffer of this size comes from mmap and costs a page fault per 4 KB on first touch (PLE
// 64-32 at 2048 rows: 779 -> about 100-200 minor faults per step with these kept).
Tensor scratch(int i, int64_t n, const at::TensorOptions& options) {
  thread_local Tensor kept[2];
  Tensor& t = kept[i];
  if (!t.defined() || t.numel() < n || t.dtype() != options.dtype() ||
      t.storage().use_count() > 1)
    t = at::empty({n}, options);
  return t.narrow(0, 0, n);
}

// Returns [dx, dW (depth x parts, shaped as weights), db (as biases)]; dx is an empty tensor
// unless need_x.
std::vector<Tensor> expert_mlp_backward_cpu(const Tensor& dy, const Tensor& x,
                                            at::TensorList weights, at::TensorList biases,
                                            at::TensorList outs, at::IntArrayRef part_sizes,
                                            int64_t per_group, bool relu, bool need_x) {
  const Bank bank(x, weights, biases, part_sizes, per_group);
  const int64_t M = x.size(-2);
  TORCH_CHECK(static_cast<int64_t>(outs.size()) == bank.depth,
              "expert_mlp_backward: one saved output per layer");
  for (int64_t l = 0; l < bank.depth; ++l) {
    TORCH_CHECK(outs[l].dim() == 3 && outs[l].size(0) == bank.E && outs[l].size(1) == M &&
                    outs[l].size(2) == bank.widths[l + 1] &&
                    outs[l].scalar_type() == dy.scalar_type(),
                "expert_mlp_backward: saved output ", l, " must be (E, M, width) of dy's dtype");
  }
  TORCH_CHECK(dy.dim() == 3 && dy.size(0) == bank.E && dy.size(1) == M &&
                  dy.size(2) == bank.widths.back(),
              "expert_mlp_backward: dy must be (E, M, D)");
  std::vector<Tensor> dws, dbs;
  for (size_t i = 0; i < weights.size(); ++i) {
    dws.push_back(at::empty_like(weights[i], at::MemoryFormat::Contiguous));
    dbs.push_back(at::empty_like(biases[i], at::MemoryFormat::Contiguous));
  }
  // each input slice's first expert writes its gradient, the others add to it
  Tensor dx = need_x ? at::empty_like(x, at::MemoryFormat::Contiguous)
                     : at::empty({0}, x.options());
  int64_t widest = 0;
  for (int64_t w : bank.widths) widest = std::max(widest, w);
  // masked: the gradient at layer l's pre-activation; carried: at its output
  Tensor masked_buf = scratch(0, M * widest, dy.options());
  Tensor carried_buf = scratch(1, M * widest, dy.options());
  for (int64_t e = 0; e < bank.E; ++e) {
    Tensor carried = dy.select(0, e);
    for (int64_t l = bank.depth - 1; l >= 0; --l) {
      const int64_t out = bank.widths[l + 1], in = bank.widths[l];
      const int64_t p = bank.part_of[e], j = bank.index_in_part[e];
      Tensor db = dbs[l * bank.P + p].narrow(0, j * out, out);
      Tensor g = relu ? masked_buf.narrow(0, 0, M * out).view({M, out}) : carried;
      relu_bias_grad(g, carried, outs[l].select(0, e), db, relu);
      Tensor layer_in = l == 0 ? bank.input(x, e) : outs[l - 1].select(0, e);
      Tensor dw = dws[l * bank.P + p].narrow(0, j * out * in, out * in).view({out, in});
      at::mm_out(dw, g.t(), layer_in);
      Tensor w = bank.weight(weights, l, e);
      if (l > 0) {
        // without a mask g may be the carried buffer itself: write into the other one
        Tensor& dst = g.data_ptr() == carried_buf.data_ptr() ? masked_buf : carried_buf;
        carried = dst.narrow(0, 0, M * in).view({M, in});
        at::mm_out(carried, g, w);
      } else if (need_x) {
        Tensor target = per_group == 0 ? dx : dx.select(0, e / per_group);
        const bool first = per_group == 0 ? e == 0 : e % per_group == 0;
        if (first) {
          at::mm_out(target, g, w);
        } else {
          target.addmm_(g, w);
        }
      }
    }
  }
  std::vector<Tensor> result{dx};
  result.insert(result.end(), dws.begin(), dws.end());
  result.insert(result.end(), dbs.begin(), dbs.end());
  return result;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mtlfast, m) {
  m.def("expert_mlp(Tensor x, Tensor[] weights, Tensor[] biases, int[] part_sizes, "
        "int per_group, bool relu) -> Tensor[]");
  m.def("expert_mlp_backward(Tensor dy, Tensor x, Tensor[] weights, Tensor[] biases, "
        "Tensor[] outs, int[] part_sizes, int per_group, bool relu, bool need_x) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(mtlfast, CPU, m) {
  m.impl("expert_mlp", &expert_mlp_cpu);
  m.impl("expert_mlp_backward", &expert_mlp_backward_cpu);
}

}  // namespace mtlfast
