import torch, torch.nn.functional as F, sys, statistics
sys.path.insert(0, '/work/main'); sys.path.insert(0, '/work/main/benchmarks')
from mtlfast.ops.grouped_linear import _blocks, activation_grad, apply_activation
import mtlfast.heads.module as M

class MLPHeadsFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, hid, outs, act):
        pre = torch.addmm(b1, x, w1.t()) if b1 is not None else x @ w1.t()
        h = torch.relu_(pre) if act == "relu" else apply_activation(pre, act)
        hs = h.split_with_sizes(hid, 1)
        W2 = _blocks(w2, hid, outs)
        b2s = b2.split_with_sizes(outs) if b2 is not None else [None] * len(outs)
        ys = tuple(torch.addmm(bt, ht, Wt.t()) if bt is not None else ht @ Wt.t()
                   for ht, Wt, bt in zip(hs, W2, b2s))
        ctx.meta = (hid, outs, act, b1 is not None)
        ctx.save_for_backward(x, w1, w2, h, pre if act in ("gelu", "silu") else None)
        return ys

    @staticmethod
    def backward(ctx, *gs):
        x, w1, w2, h, pre = ctx.saved_tensors
        hid, outs, act, has_bias = ctx.meta
        M_ = x.shape[0]
        gw2 = w2.new_empty(w2.shape)
        gh = h.new_empty(h.shape)
        gb2 = w2.new_empty(sum(outs)) if has_bias else None
        o = 0; c = 0
        for t, (g, Wt, gWt, n, k) in enumerate(zip(gs, _blocks(w2, hid, outs), _blocks(gw2, hid, outs), outs, hid)):
            ht = h[:, c:c + k]
            if g is None:
                gWt.zero_(); gh[:, c:c + k].zero_()
                if has_bias: gb2[o:o + n].zero_()
            else:
                torch.mm(g.t(), ht, out=gWt)
                torch.mm(g, Wt, out=gh[:, c:c + k])
                if has_bias: torch.sum(g, 0, out=gb2[o:o + n])
            o += n; c += k
        gpre = activation_grad(gh, pre, h, act)
        gx = gpre @ w1 if ctx.needs_input_grad[0] else None
        gw1 = gpre.t() @ x
        gb1 = gpre.sum(0) if has_bias else None
        return gx, gw1, gb1, gw2, gb2, None, None, None

def fwd(self, z):
    ys = MLPHeadsFn.apply(z, self.weight1, self.bias1, self.weight2, self.bias2, list(self.hidden_widths), list(self.out_widths), self.activation)
    return dict(zip(self.tasks, ys))

from heads_grid import contenders, measure, widths_of
from mtlfast.bench.heads_suite import _step
import copy
torch.set_num_threads(1)
cases = [(2,16,'ragged',32),(2,16,'ones',32),(2,64,'ragged',256),(4,16,'ragged',32),(4,8,'ragged',32),(8,16,'ragged',32),(8,64,'ones',256),(40,16,'ones',32)]
for dt in (torch.float32, torch.bfloat16):
  for T, hid, kind, B in cases:
    runs = contenders(64, hid, widths_of(kind, T), B, dt)
    # build the new fused on same weights: reuse fused closure's module? recreate
    import mtlfast
    from mtlfast.bench.heads_suite import make_heads
    heads = make_heads(64, hid, widths_of(kind, T), torch.device('cpu')).to(dt)
    fh = mtlfast.fuse_heads(copy.deepcopy(heads))
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(B, 64, generator=gen).to(dt).requires_grad_()
    cot = torch.randn(B, sum(widths_of(kind, T)), generator=gen).to(dt)
    new = _step(lambda x: fwd(fh, x), list(fh.parameters()), z, cot)
    runs = {"fused": new, **{k: v for k, v in runs.items()}}
    runs["old"] = runs.pop("fused") if False else runs["fused"]
    r2 = {"fused": new, "old": contenders(64, hid, widths_of(kind, T), B, dt)["fused"], "loop": runs["loop"], "concat+bmm": runs["concat+bmm"]}
    ms, ratio = measure(r2, 7, 3.0)
    best = min(ms["loop"], ms["concat+bmm"])
    print(dt, T, hid, kind, B, {k: round(v*1000) for k, v in ms.items()}, "new/best %.2f old/best %.2f" % (ms["fused"]/best, ms["old"]/best), flush=True)
