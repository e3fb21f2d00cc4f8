import torch, sys, copy
sys.path.insert(0, '/work/main/benchmarks')
import mtlfast
from heads_grid import contenders, measure, widths_of
from mtlfast.bench.heads_suite import _step, make_heads
torch.set_num_threads(1)
op = torch.ops.mtlfast.mlp_heads
from mtlfast.ops.mlp_heads import layer2_for
cases = [tuple(int(a) if a.isdigit() else a for a in c.split(",")) for c in sys.argv[1:]]
for dt in (torch.float32,):
  for T, hid, kind, B in cases:
    w = widths_of(kind, T)
    c = contenders(64, hid, w, B, dt)
    heads = make_heads(64, hid, w, torch.device('cpu')).to(dt)
    fh = mtlfast.fuse_heads(copy.deepcopy(heads))
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(B, 64, generator=gen).to(dt).requires_grad_()
    cot = torch.randn(B, sum(w), generator=gen).to(dt)
    mode = layer2_for(z, fh.hidden_widths, fh.out_widths)
    raw = lambda x: dict(zip(fh.tasks, op(x, fh.weight1, fh.bias1, fh.weight2, fh.bias2, fh.hidden_widths, fh.out_widths, "relu", mode)))
    r = {"fused": c["fused"], "raw": _step(raw, list(fh.parameters()), z, cot), "loop": c["loop"], "concat+bmm": c["concat+bmm"]}
    ms, ratio = measure(r, 15, 3.0)
    best = min(ms["loop"], ms["concat+bmm"])
    print(T, hid, kind, B, {k: round(v*1000) for k, v in ms.items()}, "fused %.2f raw %.2f" % (ms["fused"]/best, ms["raw"]/best), flush=True)
