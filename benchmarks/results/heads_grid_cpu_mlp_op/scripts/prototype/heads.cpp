#include <torch/extension.h>
#include <torch/csrc/autograd/custom_function.h>
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using at::Tensor;

static Tensor act_fwd(Tensor pre, int64_t act) {
  switch (act) {
    case 1: return at::relu_(pre);
    case 2: return at::gelu(pre);
    case 3: return at::silu(pre);
    default: return pre;
  }
}
static Tensor act_bwd(const Tensor& g, const Tensor& pre, const Tensor& h, int64_t act) {
  switch (act) {
    case 1: return at::threshold_backward(g, h, 0);
    case 2: return at::gelu_backward(g, pre);
    case 3: return at::silu_backward(g, pre);
    default: return g;
  }
}

struct MLPHeads : public torch::autograd::Function<MLPHeads> {
  static variable_list forward(AutogradContext* ctx, Tensor x, Tensor w1, Tensor b1, Tensor w2,
                               Tensor b2, std::vector<int64_t> hid, std::vector<int64_t> outs,
                               int64_t act) {
    Tensor pre = b1.defined() ? at::addmm(b1, x, w1.t()) : at::mm(x, w1.t());
    Tensor h = act_fwd(act == 1 ? pre : pre, act);
    variable_list ys;
    int64_t wo = 0, c = 0, o = 0;
    for (size_t t = 0; t < hid.size(); ++t) {
      int64_t k = hid[t], n = outs[t];
      Tensor W = w2.narrow(0, wo, n * k).view({n, k});
      Tensor ht = h.narrow(1, c, k);
      ys.push_back(b2.defined() ? at::addmm(b2.narrow(0, o, n), ht, W.t()) : at::mm(ht, W.t()));
      wo += n * k; c += k; o += n;
    }
    ctx->save_for_backward({x, w1, b1, w2, b2});
    ctx->saved_data["h"] = h;
    ctx->saved_data["pre"] = (act == 2 || act == 3) ? pre : Tensor();
    ctx->saved_data["hid"] = hid;
    ctx->saved_data["outs"] = outs;
    ctx->saved_data["act"] = act;
    return ys;
  }

  static variable_list backward(AutogradContext* ctx, variable_list gs) {
    auto saved = ctx->get_saved_variables();
    Tensor x = saved[0], w1 = saved[1], b1 = saved[2], w2 = saved[3], b2 = saved[4];
    Tensor h = ctx->saved_data["h"].toTensor();
    Tensor pre = ctx->saved_data["pre"].toTensor();
    auto hid = ctx->saved_data["hid"].toIntVector();
    auto outs = ctx->saved_data["outs"].toIntVector();
    int64_t act = ctx->saved_data["act"].toInt();
    int64_t M = x.size(0), H = h.size(1), N = 0;
    for (auto n : outs) N += n;
    Tensor gh = at::empty({M, H}, h.options());
    Tensor gw2 = at::empty_like(w2);
    Tensor gb2 = b2.defined() ? at::empty({N}, w2.options()) : Tensor();
    int64_t wo = 0, c = 0, o = 0;
    for (size_t t = 0; t < hid.size(); ++t) {
      int64_t k = hid[t], n = outs[t];
      Tensor gW = gw2.narrow(0, wo, n * k).view({n, k});
      Tensor ght = gh.narrow(1, c, k);
      const Tensor& g = gs[t];
      if (!g.defined()) {
        gW.zero_(); ght.zero_();
        if (gb2.defined()) gb2.narrow(0, o, n).zero_();
      } else {
        at::mm_out(gW, g.t(), h.narrow(1, c, k));
        at::mm_out(ght, g, w2.narrow(0, wo, n * k).view({n, k}));
        if (gb2.defined()) { Tensor gbt = gb2.narrow(0, o, n); at::sum_out(gbt, g, 0); }
      }
      wo += n * k; c += k; o += n;
    }
    Tensor gpre = act_bwd(gh, pre, h, act);
    Tensor gx = ctx->needs_input_grad(0) ? at::mm(gpre, w1) : Tensor();
    Tensor gw1 = at::mm(gpre.t(), x);
    Tensor gb1 = b1.defined() ? gpre.sum(0) : Tensor();
    return {gx, gw1, gb1, gw2, gb2, Tensor(), Tensor(), Tensor()};
  }
};

variable_list mlp_heads(Tensor x, Tensor w1, c10::optional<Tensor> b1, Tensor w2,
                        c10::optional<Tensor> b2, std::vector<int64_t> hid,
                        std::vector<int64_t> outs, int64_t act) {
  return MLPHeads::apply(x, w1, b1.value_or(Tensor()), w2, b2.value_or(Tensor()), hid, outs, act);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("mlp_heads", &mlp_heads); }
