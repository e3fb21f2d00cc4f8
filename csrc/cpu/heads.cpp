// Few small MLP heads (FusedHeads' eager CPU path), forward and backward as ONE autograd node:
//   h = dropout(act(x W1^T + b1))           one GEMM for every head's first layer
//   y_t = h[:, cols_t] W2_t^T + b2_t        the second layers ("groups": a GEMM each; "bmm":
//                                           one batched GEMM over equal hidden widths, out
//                                           widths zero-padded to the widest; "dot": width-1
//                                           heads of equal hidden width, a multiply-sum)
// or, for heads whose hidden layers are large ("heads"), each head's two layers on its own
// (the fused hidden layer only moves memory there), its gradients written into the packed
// gradient buffers instead of concatenated. "heads" also takes per-task inputs: x (T, M, D),
// head t on x[t].
// At these sizes a step is bound by per-node costs, not FLOPs: the same math as plain ATen ops
// under torch's autograd needs a node per op plus the split nodes of the packed parameters
// (about 10 us each on the CPU), and the Python of an autograd.Function costs as much again.
// Here the backward is one C++ node whose gradients come straight out of the GEMMs.
//
// Double backward (create_graph) recomputes the hidden layer under autograd and runs the same
// formulas as differentiable ops; inputs carrying forward-mode tangents take the plain ATen
// composition (which torch differentiates in both modes). With ``upcast`` the GEMMs of bf16 /
// fp16 calls run in fp32 (gemm_in_fp32: CPUs without native low-precision GEMMs).
#include <torch/library.h>
#include <torch/csrc/autograd/custom_function.h>
#include <ATen/ATen.h>

#include <algorithm>
#include <initializer_list>
#include <string>
#include <vector>

namespace mtlfast {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

enum class Act : int64_t { none = 0, relu = 1, gelu = 2, silu = 3 };
enum class Layer2 : int64_t { groups = 0, bmm = 1, dot = 2, heads = 3 };

Act act_of(const std::string& name) {
  if (name == "none") return Act::none;
  if (name == "relu") return Act::relu;
  if (name == "gelu") return Act::gelu;
  TORCH_CHECK(name == "silu", "mlp_heads: activation must be none, relu, gelu or silu, got ",
              name);
  return Act::silu;
}

Layer2 layer2_of(const std::string& name) {
  if (name == "groups") return Layer2::groups;
  if (name == "bmm") return Layer2::bmm;
  if (name == "heads") return Layer2::heads;
  TORCH_CHECK(name == "dot", "mlp_heads: layer2 must be groups, bmm, dot or heads, got ", name);
  return Layer2::dot;
}

struct Shape {
  std::vector<int64_t> hid, outs;
  int64_t T = 0, H = 0, N = 0, n_max = 0;
  bool per_task = false;  // x (T, M, D): head t reads x[t]
  double p = 0;           // dropout on the hidden layer (training)
  Act act = Act::none;
  Layer2 layer2 = Layer2::groups;
  bool up = false;        // low-precision GEMMs run in fp32 (see gemm_in_fp32)
};

void check_like_x(const char* op, const Tensor& x, std::initializer_list<const Tensor*> ts) {
  for (const Tensor* t : ts) {
    TORCH_CHECK(!t->defined() || (t->scalar_type() == x.scalar_type() &&
                                  t->device() == x.device()),
                op, ": every tensor must have x's dtype and device");
  }
}

// Gradients written into preallocated packed buffers (out= GEMMs) where autograd hands plain
// tensors outside create_graph; a batched gradient (is_grads_batched) has no storage.
bool writable(const variable_list& gs) {
  return !at::GradMode::is_enabled() &&
         std::all_of(gs.begin(), gs.end(), [](const Tensor& g) { return g.has_storage(); });
}

// CPUs without a native bf16/fp16 GEMM (torch's mkldnn checks answer no: an AVX2-only AMD EPYC
// here) run low-precision GEMMs in a scalar loop, 30-60x an fp32 GEMM of the same size. With
// ``upcast`` (the caller's check) every GEMM of these ops runs as an fp32 GEMM of the upcast
// operands, its result rounded once: what a native low-precision GEMM computes (products
// accumulated in fp32), in another summation order. Everything else stays in x's dtype.
bool gemm_in_fp32(const Tensor& x, bool upcast) {
  return upcast && (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf);
}

Tensor f32(const Tensor& t) { return t.defined() ? t.to(at::kFloat) : t; }

Tensor mm(const Tensor& a, const Tensor& b, bool up) {
  return up ? at::mm(f32(a), f32(b)).to(a.scalar_type()) : at::mm(a, b);
}

Tensor bmm(const Tensor& a, const Tensor& b, bool up) {
  return up ? at::bmm(f32(a), f32(b)).to(a.scalar_type()) : at::bmm(a, b);
}

Tensor baddbmm(const Tensor& c, const Tensor& a, const Tensor& b, bool up) {
  return up ? at::baddbmm(f32(c), f32(a), f32(b)).to(a.scalar_type()) : at::baddbmm(c, a, b);
}

// out = a b, into a view of a packed gradient buffer
void mm_into(Tensor out, const Tensor& a, const Tensor& b, bool up) {
  if (up) {
    out.copy_(at::mm(f32(a), f32(b)));
  } else {
    at::mm_out(out, a, b);
  }
}

// acc += a b, rounded once
void addmm_into(Tensor& acc, const Tensor& a, const Tensor& b, bool up) {
  if (up) {
    acc.copy_(at::addmm(f32(acc), f32(a), f32(b)));
  } else {
    acc.addmm_(a, b);
  }
}

Shape shape_of(const Tensor& x, const Tensor& w1, const Tensor& b1, const Tensor& w2,
               const Tensor& b2, at::IntArrayRef hid, at::IntArrayRef outs,
               const std::string& activation, const std::string& layer2, double dropout,
               bool upcast) {
  Shape s;
  TORCH_CHECK(dropout >= 0 && dropout < 1, "mlp_heads: dropout must be in [0, 1), got ",
              dropout);
  s.p = dropout;
  s.hid = hid.vec();
  s.outs = outs.vec();
  s.T = static_cast<int64_t>(hid.size());
  s.act = act_of(activation);
  s.layer2 = layer2_of(layer2);
  TORCH_CHECK(s.T >= 1 && outs.size() == hid.size(),
              "mlp_heads: hidden and outs must be non-empty and of equal length");
  int64_t packed = 0;
  for (int64_t t = 0; t < s.T; ++t) {
    TORCH_CHECK(hid[t] >= 1 && outs[t] >= 1, "mlp_heads: every width must be >= 1");
    s.H += hid[t];
    s.N += outs[t];
    packed += hid[t] * outs[t];
    s.n_max = std::max(s.n_max, outs[t]);
    TORCH_CHECK(s.layer2 == Layer2::groups || s.layer2 == Layer2::heads || hid[t] == hid[0],
                "mlp_heads: layer2 bmm / dot needs equal hidden widths");
  }
  TORCH_CHECK(s.layer2 != Layer2::dot || s.n_max == 1, "mlp_heads: layer2 dot needs outs of 1");
  s.per_task = x.dim() == 3;
  TORCH_CHECK((x.dim() == 2 || (s.per_task && x.size(0) == s.T)) && w1.dim() == 2 &&
                  w1.size(0) == s.H && w1.size(1) == x.size(-1),
              "mlp_heads: x must be (M, D), or (T, M, D) per task, and w1 (sum hidden, D)");
  TORCH_CHECK(!s.per_task || s.layer2 == Layer2::heads,
              "mlp_heads: per-task x (T, M, D) needs layer2 heads");
  TORCH_CHECK(w2.dim() == 1 && w2.numel() == packed, "mlp_heads: w2 must be the flat packed "
              "second-layer weights of sum(hidden_t * outs_t) elements");
  TORCH_CHECK(!b1.defined() || (b1.dim() == 1 && b1.numel() == s.H),
              "mlp_heads: b1 must be (sum hidden,)");
  TORCH_CHECK(!b2.defined() || (b2.dim() == 1 && b2.numel() == s.N),
              "mlp_heads: b2 must be (sum outs,)");
  check_like_x("mlp_heads", x, {&w1, &b1, &w2, &b2});
  s.up = gemm_in_fp32(x, upcast);
  return s;
}

Tensor activate(Tensor pre, Act act) {
  switch (act) {
    case Act::relu: return at::relu_(pre);  // addmm's backward does not read its output
    case Act::gelu: return at::gelu(pre);
    case Act::silu: return at::silu(pre);
    default: return pre;
  }
}

Tensor activation_backward(const Tensor& g, const Tensor& pre, const Tensor& h, Act act) {
  switch (act) {
    case Act::relu: return at::threshold_backward(g, h, 0);
    case Act::gelu: return at::gelu_backward(g, pre);
    case Act::silu: {
      if (!at::GradMode::is_enabled()) return at::silu_backward(g, pre);
      Tensor sig = at::sigmoid(pre);  // create_graph: silu_backward has no derivative
      return g * sig * (1 + pre * (1 - sig));
    }
    default: return g;
  }
}

Tensor linear(const Tensor& x, const Tensor& w, const Tensor& b, bool up) {
  if (!b.defined()) return mm(x, w.t(), up);
  return up ? at::addmm(f32(b), f32(x), f32(w).t()).to(x.scalar_type()) : at::addmm(b, x, w.t());
}

Tensor slice(const Tensor& t, int64_t off, int64_t len) {
  return t.defined() ? t.narrow(0, off, len) : Tensor();
}

// act(x W1^T + b1) and the pre-activation (the same tensor for relu and none)
std::pair<Tensor, Tensor> hidden_layer(const Tensor& x, const Tensor& w1, const Tensor& b1,
                                       Act act, bool up) {
  Tensor pre = linear(x, w1, b1, up);
  if (act == Act::relu || act == Act::none) {
    Tensor h = activate(pre, act);
    return {h, h};
  }
  return {activate(pre, act), pre};
}

bool ragged(const Shape& s) { return s.n_max * s.T != s.N; }

// Row j of head t (of the packed (N, ...) rows) at row t * n_max + j of the padded layout.
Tensor pad_positions(const Shape& s, const at::Device& device) {
  std::vector<int64_t> pos;
  pos.reserve(s.N);
  for (int64_t t = 0; t < s.T; ++t) {
    for (int64_t j = 0; j < s.outs[t]; ++j) pos.push_back(t * s.n_max + j);
  }
  return at::tensor(pos, at::TensorOptions().dtype(at::kLong)).to(device);
}

// The packed rows copied into zeros at ``pos`` (padding rows exact zeros: an inf weight gives
// no 0 * inf); its backward is one gather. Undefined ``pos``: not ragged, the rows as they are.
Tensor padded(const Tensor& rows, const Shape& s, const Tensor& pos) {
  if (!pos.defined()) return rows;
  std::vector<int64_t> shape = rows.sizes().vec();
  shape[0] = s.T * s.n_max;
  return rows.new_zeros(shape).index_copy(0, pos, rows);
}

// The hidden layer's dropout as F.dropout runs it on the CPU (one bernoulli draw over the
// layer: the op draws the masks the ATen path would), its noise kept for the backward.
Tensor dropout_noise(const Tensor& h, double p) {
  return at::empty_like(h).bernoulli_(1 - p).div_(1 - p);
}

variable_list second_layer(const Tensor& h, const Tensor& w2, const Tensor& b2, const Shape& s) {
  const int64_t M = h.size(0);
  if (s.layer2 == Layer2::dot) {  // T dot products per row
    const int64_t k = s.hid[0];
    Tensor y = (h.view({M, s.T, k}) * w2.view({s.T, k})).sum(-1);
    if (b2.defined()) y = y + b2;
    return y.split(1, 1);
  }
  if (s.layer2 == Layer2::bmm) {
    const int64_t k = s.hid[0], n = s.n_max;
    const Tensor pos = ragged(s) ? pad_positions(s, h.device()) : Tensor();
    Tensor hs = h.view({M, s.T, k}).transpose(0, 1);
    Tensor W = padded(w2.view({-1, k}), s, pos).view({s.T, n, k}).transpose(1, 2);
    Tensor y = b2.defined() ? baddbmm(padded(b2, s, pos).view({s.T, 1, n}), hs, W, s.up)
                            : bmm(hs, W, s.up);
    variable_list ys = y.unbind(0);
    for (int64_t t = 0; t < s.T; ++t) {
      if (s.outs[t] < n) ys[t] = ys[t].narrow(1, 0, s.outs[t]);
    }
    return ys;
  }
  variable_list ys;
  int64_t wo = 0, c = 0, o = 0;
  for (int64_t t = 0; t < s.T; ++t) {
    const int64_t k = s.hid[t], n = s.outs[t];
    Tensor W = w2.narrow(0, wo, n * k).view({n, k});
    Tensor ht = h.narrow(1, c, k);
    ys.push_back(linear(ht, W, slice(b2, o, n), s.up));
    wo += n * k;
    c += k;
    o += n;
  }
  return ys;
}

// d/dh, d/dW2 (flat, packed) and d/db2 of the second layer, from the heads' output gradients
struct Layer2Grads {
  Tensor gh, gw2, gb2;
};

Layer2Grads second_layer_backward(const variable_list& gs, const Tensor& h, const Tensor& w2,
                                  bool bias, const Shape& s) {
  const int64_t M = h.size(0);
  Layer2Grads r;
  if (s.layer2 == Layer2::dot) {
    const int64_t k = s.hid[0];
    Tensor G = at::cat(gs, 1);  // (M, T)
    r.gw2 = (G.unsqueeze(-1) * h.view({M, s.T, k})).sum(0).reshape(-1);
    r.gh = (G.unsqueeze(-1) * w2.view({s.T, k})).reshape({M, s.H});
    if (bias) r.gb2 = G.sum(0);
    return r;
  }
  if (s.layer2 == Layer2::bmm) {
    const int64_t k = s.hid[0], n = s.n_max;
    variable_list gp;
    for (int64_t t = 0; t < s.T; ++t) {
      gp.push_back(s.outs[t] < n ? at::constant_pad_nd(gs[t], {0, n - s.outs[t]}) : gs[t]);
    }
    Tensor G = at::stack(gp);  // (T, M, n_max)
    const Tensor pos = ragged(s) ? pad_positions(s, h.device()) : Tensor();
    Tensor gW = bmm(G.transpose(1, 2), h.view({M, s.T, k}).transpose(0, 1), s.up);
    r.gh = bmm(G, padded(w2.view({-1, k}), s, pos).view({s.T, n, k}), s.up)
               .transpose(0, 1).reshape({M, s.H});
    if (bias) r.gb2 = G.sum(1).reshape(-1);
    if (pos.defined()) {
      gW = gW.reshape({-1, k}).index_select(0, pos);
      if (bias) r.gb2 = r.gb2.index_select(0, pos);
    }
    r.gw2 = gW.reshape(-1);
    return r;
  }
  // Written into (M, H) and packed buffers, each head's GEMM into its column block (a BLAS
  // leading dimension, no copy), where autograd takes plain tensors; else concatenated.
  const bool into = s.T > 1 && writable(gs);
  variable_list gw, gh, gb;
  if (into) {
    r.gw2 = at::empty_like(w2);
    r.gh = at::empty({M, s.H}, h.options());
    if (bias) r.gb2 = at::empty({s.N}, w2.options());
  }
  int64_t wo = 0, c = 0, o = 0;
  for (int64_t t = 0; t < s.T; ++t) {
    const int64_t k = s.hid[t], n = s.outs[t];
    const Tensor W = w2.narrow(0, wo, n * k).view({n, k}), ht = h.narrow(1, c, k);
    if (into) {
      mm_into(r.gw2.narrow(0, wo, n * k).view({n, k}), gs[t].t(), ht, s.up);
      mm_into(r.gh.narrow(1, c, k), gs[t], W, s.up);
      if (bias) {
        Tensor gbt = r.gb2.narrow(0, o, n);
        at::sum_out(gbt, gs[t], 0);
      }
    } else {
      gw.push_back(mm(gs[t].t(), ht, s.up).reshape(-1));
      gh.push_back(mm(gs[t], W, s.up));
      if (bias) gb.push_back(gs[t].sum(0));
    }
    wo += n * k;
    c += k;
    o += n;
  }
  if (!into) {
    r.gw2 = s.T == 1 ? gw[0] : at::cat(gw);
    r.gh = s.T == 1 ? gh[0] : at::cat(gh, 1);
    if (bias) r.gb2 = s.T == 1 ? gb[0] : at::cat(gb);
  }
  return r;
}

// "heads": each head's hidden layer (its pre-activation, and with dropout its noise and the
// second layer's input) and output on its own; ``noises``: the forward's, when recomputing
struct HeadsForward {
  std::vector<Tensor> hs, pres, noises, ins;
  variable_list ys;
};

HeadsForward heads_forward(const Tensor& x, const Tensor& w1, const Tensor& b1,
                           const Tensor& w2, const Tensor& b2, const Shape& s,
                           const std::vector<Tensor>* noises = nullptr) {
  HeadsForward r;
  int64_t wo = 0, c = 0, o = 0;
  for (int64_t t = 0; t < s.T; ++t) {
    const int64_t k = s.hid[t], n = s.outs[t];
    auto [h, pre] = hidden_layer(s.per_task ? x.select(0, t) : x, w1.narrow(0, c, k),
                                 slice(b1, c, k), s.act, s.up);
    Tensor in = h;
    if (s.p > 0) {
      r.noises.push_back(noises ? (*noises)[t] : dropout_noise(h, s.p));
      in = h * r.noises.back();
      r.ins.push_back(in);
    }
    r.ys.push_back(linear(in, w2.narrow(0, wo, n * k).view({n, k}), slice(b2, o, n), s.up));
    r.hs.push_back(h);
    r.pres.push_back(pre);
    wo += n * k;
    c += k;
    o += n;
  }
  return r;
}

// The gradients of "heads": written into the packed buffers where autograd takes plain
// tensors (no cat of the weight gradients: at large heads a copy of every weight), else as
// differentiable ops (create_graph) that also take batched gradients (no out= there).
variable_list heads_backward(const variable_list& gs, const Tensor& x, const Tensor& w1,
                             const Tensor& w2, const HeadsForward& f, bool bias1, bool bias2,
                             bool need_x, const Shape& s) {
  const bool into = writable(gs);
  Tensor gx, gw1, gb1, gw2, gb2;
  variable_list gw1s, gb1s, gw2s, gb2s, gxs;
  if (into) {
    if (need_x && s.per_task) gx = at::empty(x.sizes(), x.options());
    gw1 = at::empty_like(w1);
    gw2 = at::empty_like(w2);
    if (bias1) gb1 = at::empty({s.H}, w1.options());
    if (bias2) gb2 = at::empty({s.N}, w2.options());
  }
  int64_t wo = 0, c = 0, o = 0;
  for (int64_t t = 0; t < s.T; ++t) {
    const int64_t k = s.hid[t], n = s.outs[t];
    const Tensor &g = gs[t], &h = f.hs[t], &in = s.p > 0 ? f.ins[t] : h;
    const Tensor W2 = w2.narrow(0, wo, n * k).view({n, k}), W1 = w1.narrow(0, c, k);
    const Tensor xt = s.per_task ? x.select(0, t) : x;
    Tensor gh = mm(g, W2, s.up);
    Tensor gpre = activation_backward(s.p > 0 ? gh * f.noises[t] : gh, f.pres[t], h, s.act);
    if (into) {
      Tensor gw2t = gw2.narrow(0, wo, n * k).view({n, k}), gw1t = gw1.narrow(0, c, k);
      mm_into(gw2t, g.t(), in, s.up);
      mm_into(gw1t, gpre.t(), xt, s.up);
      if (bias2) {
        Tensor gb2t = gb2.narrow(0, o, n);
        at::sum_out(gb2t, g, 0);
      }
      if (bias1) {
        Tensor gb1t = gb1.narrow(0, c, k);
        at::sum_out(gb1t, gpre, 0);
      }
      if (need_x && s.per_task) {
        mm_into(gx.select(0, t), gpre, W1, s.up);
      } else if (need_x) {
        if (t == 0) {
          gx = mm(gpre, W1, s.up);
        } else {
          addmm_into(gx, gpre, W1, s.up);
        }
      }
    } else {
      gw2s.push_back(mm(g.t(), in, s.up).reshape(-1));
      gw1s.push_back(mm(gpre.t(), xt, s.up));
      if (bias2) gb2s.push_back(g.sum(0));
      if (bias1) gb1s.push_back(gpre.sum(0));
      if (need_x && s.per_task) {
        gxs.push_back(mm(gpre, W1, s.up));
      } else if (need_x) {
        gx = t == 0 ? mm(gpre, W1, s.up) : gx + mm(gpre, W1, s.up);
      }
    }
    wo += n * k;
    c += k;
    o += n;
  }
  if (!into) {
    if (need_x && s.per_task) gx = at::stack(gxs);
    gw1 = at::cat(gw1s);
    gw2 = at::cat(gw2s);
    if (bias1) gb1 = at::cat(gb1s);
    if (bias2) gb2 = at::cat(gb2s);
  }
  return {gx, gw1, gb1, gw2, gb2, Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
}

struct MLPHeads : public torch::autograd::Function<MLPHeads> {
  // (the biases as optionals: an undefined Tensor argument is not allowed here)
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& w1,
                               const std::optional<Tensor>& bias1, const Tensor& w2,
                               const std::optional<Tensor>& bias2, at::IntArrayRef hid,
                               at::IntArrayRef outs, const std::string& activation,
                               const std::string& layer2, double dropout, bool upcast) {
    const Tensor b1 = bias1.value_or(Tensor()), b2 = bias2.value_or(Tensor());
    Shape s = shape_of(x, w1, b1, w2, b2, hid, outs, activation, layer2, dropout, upcast);
    HeadsForward f;
    if (s.layer2 == Layer2::heads) {
      f = heads_forward(x, w1, b1, w2, b2, s);
    } else {
      auto [h, pre] = hidden_layer(x, w1, b1, s.act, s.up);
      f.hs = {h};
      f.pres = {pre};
      if (s.p > 0) {
        f.noises = {dropout_noise(h, s.p)};
        f.ins = {h * f.noises[0]};
      }
      f.ys = second_layer(s.p > 0 ? f.ins[0] : h, w2, b2, s);
    }
    ctx->save_for_backward({x, w1, b1, w2});
    ctx->saved_data["h"] = f.hs;
    ctx->saved_data["pre"] = f.pres;
    if (s.p > 0) {
      ctx->saved_data["noise"] = f.noises;
      ctx->saved_data["in"] = f.ins;
    }
    ctx->saved_data["hid"] = s.hid;
    ctx->saved_data["outs"] = s.outs;
    ctx->saved_data["activation"] = activation;
    ctx->saved_data["layer2"] = layer2;
    ctx->saved_data["dropout"] = dropout;
    ctx->saved_data["upcast"] = s.up;
    ctx->saved_data["bias2"] = b2.defined();
    return f.ys;
  }

  static variable_list backward(AutogradContext* ctx, variable_list gs) {
    auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &w1 = saved[1], &b1 = saved[2], &w2 = saved[3];
    const bool bias2 = ctx->saved_data["bias2"].toBool();
    Shape s = shape_of(x, w1, b1, w2, Tensor(), ctx->saved_data["hid"].toIntVector(),
                       ctx->saved_data["outs"].toIntVector(),
                       ctx->saved_data["activation"].toStringRef(),
                       ctx->saved_data["layer2"].toStringRef(),
                       ctx->saved_data["dropout"].toDouble(),
                       ctx->saved_data["upcast"].toBool());
    HeadsForward f;
    f.hs = ctx->saved_data["h"].toTensorVector();
    f.pres = ctx->saved_data["pre"].toTensorVector();
    if (s.p > 0) {
      f.noises = ctx->saved_data["noise"].toTensorVector();
      f.ins = ctx->saved_data["in"].toTensorVector();
    }
    if (s.layer2 == Layer2::heads) {
      if (at::GradMode::is_enabled()) {  // create_graph: see below (the same dropout noise)
        f = heads_forward(x, w1, b1, w2, Tensor(), s, &f.noises);
      }
      return heads_backward(gs, x, w1, w2, f, b1.defined() && ctx->needs_input_grad(2), bias2,
                            ctx->needs_input_grad(0), s);
    }
    Tensor h = f.hs[0], pre = f.pres[0], noise = s.p > 0 ? f.noises[0] : Tensor();
    Tensor in = s.p > 0 ? f.ins[0] : h;
    if (at::GradMode::is_enabled()) {
      // create_graph: the saved hidden layer was computed without a graph
      std::tie(h, pre) = hidden_layer(x, w1, b1, s.act, s.up);
      in = s.p > 0 ? h * noise : h;
    }
    Layer2Grads l2 = second_layer_backward(gs, in, w2, bias2, s);
    Tensor gpre = activation_backward(s.p > 0 ? l2.gh * noise : l2.gh, pre, h, s.act);
    Tensor gx = ctx->needs_input_grad(0) ? mm(gpre, w1, s.up) : Tensor();
    Tensor gw1 = ctx->needs_input_grad(1) ? mm(gpre.t(), x, s.up) : Tensor();
    Tensor gb1 = b1.defined() && ctx->needs_input_grad(2) ? gpre.sum(0) : Tensor();
    return {gx, gw1, gb1, l2.gw2, l2.gb2, Tensor(), Tensor(), Tensor(), Tensor(), Tensor(),
            Tensor()};
  }
};

bool has_tangent(const Tensor& t) { return t.defined() && t._fw_grad(/*level=*/0).defined(); }

std::vector<Tensor> mlp_heads(const Tensor& x, const Tensor& w1, const std::optional<Tensor>& b1,
                              const Tensor& w2, const std::optional<Tensor>& b2,
                              at::IntArrayRef hidden, at::IntArrayRef outs,
                              c10::string_view activation, c10::string_view layer2,
                              double dropout, bool upcast) {
  const Tensor bias1 = b1.value_or(Tensor()), bias2 = b2.value_or(Tensor());
  const std::string act(activation), mode(layer2);
  if (has_tangent(x) || has_tangent(w1) || has_tangent(bias1) || has_tangent(w2) ||
      has_tangent(bias2)) {
    Shape s = shape_of(x, w1, bias1, w2, bias2, hidden, outs, act, mode, dropout, upcast);
    if (s.layer2 == Layer2::heads) return heads_forward(x, w1, bias1, w2, bias2, s).ys;
    Tensor h = hidden_layer(x, w1, bias1, s.act, s.up).first;
    return second_layer(s.p > 0 ? h * dropout_noise(h, s.p) : h, w2, bias2, s);
  }
  return MLPHeads::apply(x, w1, b1, w2, b2, hidden, outs, act, mode, dropout, upcast);
}

// Linear heads on per-task inputs, y_t = x[t] W_t^T + b_t (W the heads' rows stacked), as one
// node: the (T, M, D) input's batched path costs a Python autograd.Function and split nodes,
// more than two to eight heads' GEMMs.
void check_linear(const Tensor& x, const Tensor& w, const Tensor& b, at::IntArrayRef outs) {
  int64_t N = 0;
  for (int64_t n : outs) {
    TORCH_CHECK(n >= 1, "linear_heads: every width must be >= 1");
    N += n;
  }
  TORCH_CHECK(x.dim() == 3 && x.size(0) == static_cast<int64_t>(outs.size()) && w.dim() == 2 &&
                  w.size(0) == N && w.size(1) == x.size(2),
              "linear_heads: x must be (T, M, D) and w (sum outs, D)");
  TORCH_CHECK(!b.defined() || (b.dim() == 1 && b.numel() == N), "linear_heads: b must be (N,)");
  check_like_x("linear_heads", x, {&w, &b});
}

variable_list linear_heads_forward(const Tensor& x, const Tensor& w, const Tensor& b,
                                   at::IntArrayRef outs, bool up) {
  variable_list ys;
  int64_t o = 0;
  for (size_t t = 0; t < outs.size(); ++t) {
    ys.push_back(linear(x.select(0, static_cast<int64_t>(t)), w.narrow(0, o, outs[t]),
                        slice(b, o, outs[t]), up));
    o += outs[t];
  }
  return ys;
}

struct LinearHeads : public torch::autograd::Function<LinearHeads> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& w,
                               const std::optional<Tensor>& bias, at::IntArrayRef outs,
                               bool upcast) {
    const Tensor b = bias.value_or(Tensor());
    check_linear(x, w, b, outs);
    const bool up = gemm_in_fp32(x, upcast);
    ctx->save_for_backward({x, w});
    ctx->saved_data["outs"] = outs.vec();
    ctx->saved_data["bias"] = b.defined();
    ctx->saved_data["upcast"] = up;
    return linear_heads_forward(x, w, b, outs, up);
  }

  static variable_list backward(AutogradContext* ctx, variable_list gs) {
    auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &w = saved[1];
    const auto outs = ctx->saved_data["outs"].toIntVector();
    const bool bias = ctx->saved_data["bias"].toBool(), need_x = ctx->needs_input_grad(0);
    const bool into = writable(gs), up = ctx->saved_data["upcast"].toBool();
    Tensor gx, gw, gb;
    variable_list gxs, gws, gbs;
    if (into) {
      if (need_x) gx = at::empty(x.sizes(), x.options());
      gw = at::empty_like(w);
      if (bias) gb = at::empty({w.size(0)}, w.options());
    }
    int64_t o = 0;
    for (size_t i = 0; i < outs.size(); ++i) {
      const auto t = static_cast<int64_t>(i);
      const int64_t n = outs[i];
      const Tensor &g = gs[i], xt = x.select(0, t), W = w.narrow(0, o, n);
      if (into) {
        Tensor gwt = gw.narrow(0, o, n);
        mm_into(gwt, g.t(), xt, up);
        if (need_x) mm_into(gx.select(0, t), g, W, up);
        if (bias) {
          Tensor gbt = gb.narrow(0, o, n);
          at::sum_out(gbt, g, 0);
        }
      } else {
        gws.push_back(mm(g.t(), xt, up));
        if (need_x) gxs.push_back(mm(g, W, up));
        if (bias) gbs.push_back(g.sum(0));
      }
      o += n;
    }
    if (!into) {
      gw = at::cat(gws);
      if (need_x) gx = at::stack(gxs);
      if (bias) gb = at::cat(gbs);
    }
    return {gx, gw, gb, Tensor(), Tensor()};
  }
};

std::vector<Tensor> linear_heads(const Tensor& x, const Tensor& w, const std::optional<Tensor>& b,
                                 at::IntArrayRef outs, bool upcast) {
  const Tensor bias = b.value_or(Tensor());
  if (has_tangent(x) || has_tangent(w) || has_tangent(bias)) {
    check_linear(x, w, bias, outs);
    return linear_heads_forward(x, w, bias, outs, gemm_in_fp32(x, upcast));
  }
  return LinearHeads::apply(x, w, b, outs, upcast);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mtlfast, m) {
  m.def("mlp_heads(Tensor x, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, int[] hidden, "
        "int[] outs, str activation, str layer2, float dropout=0.0, bool upcast=False) "
        "-> Tensor[]");
  m.def("linear_heads(Tensor x, Tensor w, Tensor? b, int[] outs, bool upcast=False) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(mtlfast, CompositeImplicitAutograd, m) {
  m.impl("mlp_heads", &mlp_heads);
  m.impl("linear_heads", &linear_heads);
}

}  // namespace mtlfast
