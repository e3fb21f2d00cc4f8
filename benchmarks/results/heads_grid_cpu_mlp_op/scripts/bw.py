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
z = torch.randn(32, 64, requires_grad=True)
w = torch.randn(32, 64, requires_grad=True)
print("grad z.sum  %.0f" % t(lambda: torch.autograd.grad(z.sum(), [z])))
print("grad (z*2).sum  %.0f" % t(lambda: torch.autograd.grad((z*2).sum(), [z])))
print("grad linear  %.0f" % t(lambda: torch.autograd.grad((z@w.t()).sum(), [z, w])))
print("fwd linear+sum only %.0f" % t(lambda: (z@w.t()).sum()))
print("backward() z.sum %.0f" % t(lambda: z.sum().backward()))
