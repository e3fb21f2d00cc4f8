import torch, sys, copy
sys.path.insert(0, "/work/main/benchmarks")
import mtlfast
from torch import nn
from heads_grid import measure, widths_of
from mtlfast.bench.heads_suite import _step
torch.set_num_threads(1)
for dt in (torch.float32, torch.bfloat16):
  for T, kind, B, D in [(2, "ones", 32, 64), (2, "ragged", 256, 64), (4, "ragged", 32, 64), (8, "ones", 256, 64), (8, "ragged", 32, 64), (16, "ones", 32, 64), (40, "ones", 32, 64), (8, "ones", 2048, 128)]:
    w = widths_of(kind, T)
    heads = nn.ModuleDict({f"t{i}": nn.Linear(D, n) for i, n in enumerate(w)}).to(dt)
    fh = mtlfast.fuse_heads(copy.deepcopy(heads))
    names = list(heads.keys())
    z = torch.randn(T, B, D).to(dt).requires_grad_()
    cot = torch.randn(B, sum(w)).to(dt)
    loop = lambda x: {n: heads[n](x[t]) for t, n in enumerate(names)}
    op = lambda x: dict(zip(names, torch.ops.mtlfast.linear_heads(x, fh.weight, fh.bias, list(w))))
    runs = {"fused": _step(lambda x: fh(x, per_task=True), list(fh.parameters()), z, cot),
            "op": _step(op, list(fh.parameters()), z, cot),
            "loop": _step(loop, list(heads.parameters()), z, cot)}
    ms, ratio = measure(runs, 11, 3.0)
    print(str(dt)[6:], T, kind, B, D, {k: round(v * 1000) for k, v in ms.items()}, "fused %.2f op %.2f" % (ms["fused"] / ms["loop"], ms["op"] / ms["loop"]), flush=True)
