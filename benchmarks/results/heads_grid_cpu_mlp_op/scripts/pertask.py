import torch, sys, copy
sys.path.insert(0, '/work/main/benchmarks')
import mtlfast
from heads_grid import measure, widths_of
from mtlfast.bench.heads_suite import _step, make_heads
torch.set_num_threads(1)
for dt in (torch.float32, torch.bfloat16):
  for T, hid, kind, B in [(2, 16, "ragged", 32), (2, 16, "ones", 32), (2, 64, "ragged", 1024), (4, 16, "ragged", 32), (4, 64, "ones", 256), (8, 16, "ones", 32), (8, 16, "ones", 256), (8, 64, "ragged", 256), (16, 16, "ones", 32), (40, 16, "ones", 32)]:
    w = widths_of(kind, T)
    heads = make_heads(64, hid, w, torch.device('cpu')).to(dt)
    fh = mtlfast.fuse_heads(copy.deepcopy(heads))
    z = torch.randn(T, B, 64).to(dt).requires_grad_()
    cot = torch.randn(B, sum(w)).to(dt)
    names = list(heads.keys())
    loop = lambda x: {n: heads[n](x[t]) for t, n in enumerate(names)}
    op = lambda x: dict(zip(fh.tasks, torch.ops.mtlfast.mlp_heads.default(x, fh.weight1, fh.bias1, fh.weight2, fh.bias2, fh.hidden_widths, fh.out_widths, "relu", "heads")))
    runs = {"fused": _step(lambda x: fh(x, per_task=True), list(fh.parameters()), z, cot),
            "op": _step(op, list(fh.parameters()), z, cot),
            "loop": _step(loop, list(heads.parameters()), z, cot)}
    ms, ratio = measure(runs, 11, 3.0)
    print(str(dt)[6:], T, hid, kind, B, {k: round(v * 1000) for k, v in ms.items()}, "fused/loop %.2f op/loop %.2f" % (ms["fused"] / ms["loop"], ms["op"] / ms["loop"]), flush=True)
