import torch, sys, copy
sys.path.insert(0, "/work/main/benchmarks")
import mtlfast
from torch import nn
from heads_grid import measure, widths_of
from mtlfast.bench.heads_suite import _step
torch.set_num_threads(1)
for T, hid, kind, B in [(2, 16, "ragged", 32), (2, 64, "ones", 256), (4, 16, "ragged", 32), (8, 16, "ones", 256), (40, 16, "ones", 32)]:
    w = widths_of(kind, T)
    heads = nn.ModuleDict({f"t{i}": nn.Sequential(nn.Linear(64, hid), nn.ReLU(), nn.Dropout(0.1), nn.Linear(hid, n)) for i, n in enumerate(w)})
    fh = mtlfast.fuse_heads(copy.deepcopy(heads))
    names = list(heads.keys())
    z = torch.randn(B, 64).requires_grad_()
    cot = torch.randn(B, sum(w))
    loop = lambda x: {n: heads[n](x) for n in names}
    runs = {"fused": _step(fh, list(fh.parameters()), z, cot), "loop": _step(loop, list(heads.parameters()), z, cot), "loop2": _step(loop, list(heads.parameters()), z, cot)}
    import heads_grid
    # outputs differ (dropout masks): time without the equality check
    calls = {k: heads_grid._calls_for(f, 3.0, __import__("time").thread_time) for k, f in runs.items()}
    import time, statistics
    ts = {k: [] for k in runs}
    for r in range(11):
        for k, f in runs.items():
            t0 = time.thread_time()
            for _ in range(calls[k]): f()
            ts[k].append((time.thread_time() - t0) / calls[k] * 1e3)
    ms = {k: statistics.median(v) for k, v in ts.items()}
    print(T, hid, kind, B, {k: round(v * 1000) for k, v in ms.items()}, "fused/loop %.2f" % (ms["fused"] / ms["loop"]), flush=True)
