import torch, sys, copy
sys.path.insert(0, '/work/main/benchmarks')
import mtlfast
from heads_grid import contenders, measure, widths_of
from mtlfast.bench.heads_suite import _step, make_heads
torch.set_num_threads(1)
op = torch.ops.mtlfast.mlp_heads
def mk(fh, mode):
    def f(z):
        return dict(zip(fh.tasks, op(z, fh.weight1, fh.bias1, fh.weight2, fh.bias2, list(fh.hidden_widths), list(fh.out_widths), fh.activation, mode)))
    return f
cases = [tuple(int(a) if a.isdigit() else a for a in c.split(",")) for c in sys.argv[1:]]
for dt in (torch.float32, torch.bfloat16):
  for T, hid, kind, B in cases:
    w = (10,) * T if kind == "u10" else tuple((5,8,6,7)[i%4] for i in range(T)) if kind == "r2" else widths_of(kind, T)
    heads = make_heads(64, hid, w, torch.device('cpu')).to(dt)
    fh = mtlfast.fuse_heads(copy.deepcopy(heads))
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(B, 64, generator=gen).to(dt).requires_grad_()
    cot = torch.randn(B, sum(w), generator=gen).to(dt)
    old = contenders(64, hid, w, B, dt)
    r2 = {"fused": _step(mk(fh, "groups"), list(fh.parameters()), z, cot)}
    if kind in ("ones", "u10", "r2", "ragged"):
        if kind == "ones": r2["dot"] = _step(mk(fh, "dot"), list(fh.parameters()), z, cot)
        r2["heads"] = _step(mk(fh, "heads"), list(fh.parameters()), z, cot)
        r2["bmm"] = _step(mk(fh, "bmm"), list(fh.parameters()), z, cot)
    r2.update(old=old["fused"], loop=old["loop"], cat=old["concat+bmm"])
    ms, ratio = measure(r2, 7, 3.0)
    best = min(ms["loop"], ms["cat"])
    print(str(dt)[6:], T, hid, kind, B, {k: round(v*1000) for k, v in ms.items()}, " ".join("%s %.2f" % (k, v / best) for k, v in ms.items() if k not in ("loop", "cat")), flush=True)
