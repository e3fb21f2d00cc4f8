import torch, sys, copy
sys.path.insert(0, sys.argv[1] + "/benchmarks")
import mtlfast
from heads_grid import measure
from mtlfast.bench.heads_suite import _step, make_heads
torch.set_num_threads(1)
for T, D, hid, B in [(8, 128, 64, 2048), (2, 128, 64, 2048), (8, 32, 64, 2048), (4, 64, 16, 256)]:
    heads = make_heads(D, hid, (1,) * T, torch.device('cpu'))
    fh = mtlfast.fuse_heads(copy.deepcopy(heads))
    z = torch.randn(T, B, D).requires_grad_()
    cot = torch.randn(B, T)
    names = list(heads.keys())
    loop = lambda x: {n: heads[n](x[t]) for t, n in enumerate(names)}
    runs = {"fused": _step(lambda x: fh(x, per_task=True), list(fh.parameters()), z, cot),
            "loop": _step(loop, list(heads.parameters()), z, cot)}
    ms, ratio = measure(runs, 11, 10.0)
    print(sys.argv[1][-6:], T, D, hid, B, {k: round(v, 3) for k, v in ms.items()}, "ratio %.2f" % ratio, flush=True)
