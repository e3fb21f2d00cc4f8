import torch, sys, copy, time, statistics
sys.path.insert(0, '/work/main/benchmarks')
import mtlfast
from mtlfast.bench.heads_suite import make_heads, _step
from mtlfast.ops.grouped_linear import _eager, _large_groups
from mtlfast.ops.mlp_heads import mlp_heads, layer2_for
from mtlfast.ops._dispatch import backend
torch.set_num_threads(1)
heads = make_heads(64, 8, (1, 1), torch.device('cpu'))
fh = mtlfast.fuse_heads(copy.deepcopy(heads))
z = torch.randn(32, 64, requires_grad=True)
cot = torch.randn(32, 2)
op = torch.ops.mtlfast.mlp_heads
ht, ot, tasks = fh.hidden_widths, fh.out_widths, fh.tasks
def raw(x):
    return dict(zip(tasks, op(x, fh.weight1, fh.bias1, fh.weight2, fh.bias2, ht, ot, "relu", "dot")))
def prep(x):
    x, batch, per_task, dtype = fh._prepare(x, None)
    return dict(zip(tasks, op(x, fh.weight1, fh.bias1, fh.weight2, fh.bias2, ht, ot, "relu", "dot")))
def eag(x):
    w1, b1, w2, b2 = fh.weight1, fh.bias1, fh.weight2, fh.bias2
    eager = _eager(x, w1, b1, w2, b2)
    return dict(zip(tasks, op(x, w1, b1, w2, b2, ht, ot, "relu", "dot")))
def disp(x):
    w1, b1, w2, b2 = fh.weight1, fh.bias1, fh.weight2, fh.bias2
    backend("mlp_heads", x, eager=True)
    return dict(zip(tasks, op(x, w1, b1, w2, b2, ht, ot, "relu", "dot")))
def l2(x):
    w1, b1, w2, b2 = fh.weight1, fh.bias1, fh.weight2, fh.bias2
    mode = layer2_for(x, ht, ot)
    return dict(zip(tasks, op(x, w1, b1, w2, b2, ht, ot, "relu", mode)))
ps = list(fh.parameters())
runs = {k: _step(f, ps, z, cot) for k, f in (("raw", raw), ("prep", prep), ("eager", eag), ("backend", disp), ("layer2", l2), ("module", fh))}
res = {k: [] for k in runs}
for r in range(21):
    for k, f in runs.items():
        t0 = time.thread_time()
        for _ in range(300): f()
        res[k].append((time.thread_time() - t0) / 300 * 1e6)
print({k: round(statistics.median(v)) for k, v in res.items()})
