import torch, sys, copy
sys.path.insert(0, '/work/main/benchmarks')
import mtlfast
from mtlfast import baselines
from heads_grid import widths_of
from mtlfast.bench.heads_suite import _step, make_heads
torch.set_num_threads(1)
T, hid, kind, B = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
dt = torch.float32
w = widths_of(kind, T)
heads = make_heads(64, hid, w, torch.device('cpu')).to(dt)
fh = mtlfast.fuse_heads(copy.deepcopy(heads))
z = torch.randn(B, 64).to(dt).requires_grad_()
cot = torch.randn(B, sum(w)).to(dt)
for name, step in (("fused", _step(fh, list(fh.parameters()), z, cot)), ("loop", _step(lambda x: baselines.heads_loop(heads, x), list(heads.parameters()), z, cot))):
    for _ in range(20): step()
    with torch.profiler.profile() as p:
        for _ in range(50): step()
    print(name)
    print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
