import torch, sys, copy
sys.path.insert(0, '/work/main/benchmarks'); sys.path.insert(0, '/tmp/s9/ext')
import s9heads, mtlfast
from heads_grid import contenders, measure, widths_of
from mtlfast.bench.heads_suite import _step, make_heads
torch.set_num_threads(1)
ACT = {"none": 0, "relu": 1, "gelu": 2, "silu": 3}
def cfwd(self, z):
    return dict(zip(self.tasks, s9heads.mlp_heads(z, self.weight1, self.bias1, self.weight2, self.bias2, list(self.hidden_widths), list(self.out_widths), ACT[self.activation])))
cases = [tuple(int(a) if a.isdigit() else a for a in c.split(",")) for c in sys.argv[1:]] or [(2,16,'ragged',32),(2,16,'ones',32),(2,64,'ragged',256),(4,16,'ragged',32),(4,8,'ragged',32),(8,16,'ragged',32),(8,64,'ones',256),(40,16,'ones',32),(2,256,'ragged',32),(4,64,'ragged',1024)]
for dt in (torch.float32, torch.bfloat16):
  for T, hid, kind, B in cases:
    w = widths_of(kind, T)
    heads = make_heads(64, hid, w, torch.device('cpu')).to(dt)
    fh = mtlfast.fuse_heads(copy.deepcopy(heads))
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(B, 64, generator=gen).to(dt).requires_grad_()
    cot = torch.randn(B, sum(w), generator=gen).to(dt)
    old = contenders(64, hid, w, B, dt)
    r2 = {"fused": _step(lambda x: cfwd(fh, x), list(fh.parameters()), z, cot), "old": old["fused"], "loop": old["loop"], "concat+bmm": old["concat+bmm"]}
    ms, ratio = measure(r2, 7, 3.0)
    best = min(ms["loop"], ms["concat+bmm"])
    print(str(dt)[6:], T, hid, kind, B, {k: round(v*1000) for k, v in ms.items()}, "cpp/best %.2f old/best %.2f" % (ms["fused"]/best, ms["old"]/best), flush=True)
