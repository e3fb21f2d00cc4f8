import torch, sys, copy, time, statistics
sys.path.insert(0, '/work/main/benchmarks')
import mtlfast
from mtlfast import baselines
from mtlfast.bench.heads_suite import make_heads
from heads_grid import widths_of
torch.set_num_threads(1)
def t(f, n=1000):
    for _ in range(50): f()
    r=[]
    for _ in range(7):
        t0=time.thread_time()
        for _ in range(n): f()
        r.append((time.thread_time()-t0)/n*1e6)
    return statistics.median(r)
T,hid,kind,B = [int(a) if a.isdigit() else a for a in sys.argv[1:5]]
dt = torch.float32 if len(sys.argv) < 6 else getattr(torch, sys.argv[5])
heads = make_heads(64, hid, widths_of(kind, T), torch.device('cpu')).to(dt)
fh = mtlfast.fuse_heads(copy.deepcopy(heads))
cat = baselines.ConcatBmmHeads(heads)
z = torch.randn(B, 64).to(dt).requires_grad_()
cot = torch.randn(B, sum(widths_of(kind, T))).to(dt)
for name, f, ps in (("fused", fh, list(fh.parameters())), ("loop", lambda x: baselines.heads_loop(heads, x), list(heads.parameters())), ("cat", cat, list(cat.parameters()))):
    def fwd(): return f(z)
    def loss():
        out = f(z); return (torch.cat(list(out.values()), -1) * cot).sum()
    def step():
        torch.autograd.grad(loss(), [z, *ps])
    with torch.no_grad():
        nog = t(fwd)
    print(name, "fwd nograd %.0f  fwd %.0f  fwd+loss %.0f  step %.0f" % (nog, t(fwd), t(loss), t(step)))
