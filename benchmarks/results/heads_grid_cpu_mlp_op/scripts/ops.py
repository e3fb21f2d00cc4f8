import torch, time
torch.set_num_threads(1)
def t(f, n=2000):
    for _ in range(50): f()
    t0=time.perf_counter()
    for _ in range(n): f()
    return (time.perf_counter()-t0)/n*1e6
for dt in (torch.float32, torch.bfloat16):
    x=torch.randn(32,64,dtype=dt); w=torch.randn(32,64,dtype=dt); b=torch.randn(32,dtype=dt)
    h=torch.randn(32,16,dtype=dt); w2=torch.randn(200,16,dtype=dt); b2=torch.randn(200,dtype=dt)
    g=torch.randn(32,200,dtype=dt)
    print(dt)
    print(" addmm 32x64x32 %.1f" % t(lambda: torch.addmm(b,x,w.t())))
    print(" mm 32x64x32 %.1f" % t(lambda: torch.mm(x,w.t())))
    print(" addmm 32x16x200 %.1f" % t(lambda: torch.addmm(b2,h,w2.t())))
    print(" mm g^T h 200x32x16 %.1f" % t(lambda: torch.mm(g.t(),h)))
    print(" relu %.1f" % t(lambda: torch.relu(h)))
    print(" sum0 %.1f" % t(lambda: g.sum(0)))
    print(" empty %.1f" % t(lambda: torch.empty(32,16,dtype=dt)))
    print(" add %.1f" % t(lambda: x+x))
