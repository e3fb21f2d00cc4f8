import torch, sys, copy
sys.path.insert(0, "/work/main/benchmarks")
import mtlfast
from torch import nn
from heads_grid import measure, widths_of
from mtlfast.bench.heads_suite import _step
torch.set_num_threads(1)
for dt in (torch.float32, torch.bfloat16):
  for T, kind, B in [(2, "ones", 32), (2, "ragged", 32), (4, "ragged", 32), (8, "ones", 256), (40, "ones", 32)]:
    w = widths_of(kind, T)
    heads = nn.ModuleDict({f"t{i}": nn.Linear(64, n) for i, n in enumerate(w)}).to(dt)
    fh = mtlfast.fuse_heads(copy.deepcopy(heads))
    names = list(heads.keys())
    for per_task in (False, True):
        z = (torch.randn(T, B, 64) if per_task else torch.randn(B, 64)).to(dt).requires_grad_()
        cot = torch.randn(B, sum(w)).to(dt)
        loop = (lambda x: {n: heads[n](x[t]) for t, n in enumerate(names)}) if per_task else (lambda x: {n: heads[n](x) for n in names})
        runs = {"fused": _step(lambda x: fh(x, per_task=per_task), list(fh.parameters()), z, cot),
                "loop": _step(loop, list(heads.parameters()), z, cot)}
        ms, ratio = measure(runs, 11, 3.0)
        print(str(dt)[6:], T, kind, B, "per_task" if per_task else "shared", {k: round(v * 1000) for k, v in ms.items()}, "ratio %.2f" % ratio, flush=True)
