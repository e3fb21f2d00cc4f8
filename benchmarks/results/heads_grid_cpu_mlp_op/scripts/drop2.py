import torch, sys, copy, time, statistics
sys.path.insert(0, "/work/main/benchmarks")
import mtlfast
from torch import nn
from heads_grid import widths_of
from mtlfast.bench.heads_suite import _step
torch.set_num_threads(1)
T, hid, kind, B = 2, 16, "ragged", 32
w = widths_of(kind, T)
for p in (0.0, 0.1):
    layers = lambda n: [nn.Linear(64, hid), nn.ReLU()] + ([nn.Dropout(p)] if p else []) + [nn.Linear(hid, n)]
    heads = nn.ModuleDict({f"t{i}": nn.Sequential(*layers(n)) for i, n in enumerate(w)})
    fh = mtlfast.fuse_heads(copy.deepcopy(heads))
    names = list(heads.keys())
    z = torch.randn(B, 64).requires_grad_()
    cot = torch.randn(B, sum(w))
    loop = lambda x: {n: heads[n](x) for n in names}
    raw = lambda x: dict(zip(fh.tasks, torch.ops.mtlfast.mlp_heads.default(x, fh.weight1, fh.bias1, fh.weight2, fh.bias2, fh.hidden_widths, fh.out_widths, "relu", "groups", p)))
    runs = {"fused": _step(fh, list(fh.parameters()), z, cot), "raw": _step(raw, list(fh.parameters()), z, cot), "loop": _step(loop, list(heads.parameters()), z, cot)}
    ts = {k: [] for k in runs}
    for r in range(21):
        for k, f in runs.items():
            t0 = time.thread_time()
            for _ in range(200): f()
            ts[k].append((time.thread_time() - t0) / 200 * 1e6)
    print("p", p, {k: round(statistics.median(v)) for k, v in ts.items()})
