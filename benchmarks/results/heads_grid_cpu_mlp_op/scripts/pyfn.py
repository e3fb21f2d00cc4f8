import torch, time, statistics
torch.set_num_threads(1)
def t(f, n=2000):
    for _ in range(50): f()
    r=[]
    for _ in range(5):
        t0=time.thread_time()
        for _ in range(n): f()
        r.append((time.thread_time()-t0)/n*1e6)
    return statistics.median(r)
class Id(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x): return x * 1
    @staticmethod
    def backward(ctx, g): return g
class Id5(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, a, b, c, d): return x * 1, x * 1
    @staticmethod
    def backward(ctx, g, g2): return g, a, a, a, a
z = torch.randn(32, 64, requires_grad=True)
a = torch.randn(10); ps = [torch.randn(10, requires_grad=True) for _ in range(4)]
print("grad z.sum  %.0f" % t(lambda: torch.autograd.grad(z.sum(), [z])))
print("grad Id(z).sum  %.0f" % t(lambda: torch.autograd.grad(Id.apply(z).sum(), [z])))
print("fwd Id(z).sum  %.0f" % t(lambda: Id.apply(z).sum()))
print("grad (z*1).sum  %.0f" % t(lambda: torch.autograd.grad((z*1).sum(), [z])))
print("grad Id5.sum  %.0f" % t(lambda: torch.autograd.grad(Id5.apply(z, *ps)[0].sum(), [z, *ps])))
