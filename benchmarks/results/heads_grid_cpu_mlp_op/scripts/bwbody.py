exec(open('/tmp/s9/proto.py').read().split("from heads_grid import")[0])
import time, statistics
def t(f, n=1000):
    for _ in range(50): f()
    r=[]
    for _ in range(5):
        t0=time.thread_time()
        for _ in range(n): f()
        r.append((time.thread_time()-t0)/n*1e6)
    return statistics.median(r)
class Ctx: pass
M_,D=32,64; hid=[16,16]; outs=[1,200]
x=torch.randn(M_,D); w1=torch.randn(32,D); b1=torch.randn(32); w2=torch.randn(16*201); b2=torch.randn(201)
h=torch.relu(torch.randn(M_,32))
ctx=Ctx(); ctx.saved_tensors=(x,w1,w2,h,None); ctx.meta=(hid,outs,"relu",True); ctx.needs_input_grad=(True,)*5
gs=(torch.randn(M_,1), torch.randn(M_,200))
print("backward body %.0f" % t(lambda: MLPHeadsFn.backward(ctx,*gs)))
print("forward body %.0f" % t(lambda: MLPHeadsFn.forward(ctx,x,w1,b1,w2,b2,hid,outs,"relu")))
g=gs[1]; gh=torch.empty(M_,32); W=w2[16:].view(200,16)
print("mm out strided %.1f" % t(lambda: torch.mm(g, W, out=gh[:,16:32])))
print("mm %.1f" % t(lambda: torch.mm(g, W)))
gw=torch.empty(200,16)
print("mm gT h out %.1f" % t(lambda: torch.mm(g.t(), h[:,16:], out=gw)))
print("mm gT h %.1f" % t(lambda: torch.mm(g.t(), h[:,16:])))
