"""bf16 Linear heads (shared features) and per-task MLP heads of 9-40 heads: FusedHeads vs the
loop of heads (heads_grid's measure, 7 rounds of >= 3 ms); run under PYTHONPATH=<tree>."""
import copy, sys, torch
torch.set_num_threads(1)
from benchmarks.heads_grid import contenders, measure, widths_of
from mtlfast import fuse_heads, baselines
from mtlfast.bench.heads_suite import make_heads
label = sys.argv[1]
for T in (8, 40):
    for B in (256, 1024):
        runs = contenders(256, None, widths_of("ragged", T), B, torch.bfloat16)
        ms, ratio = measure(runs, 7, 3.0)
        print(f"{label} linear shared T={T} B={B}: fused {ms['fused']:.2f} loop {ms['loop']:.2f} concat {ms['concat+bmm']:.2f} ms, ratio {ratio:.2f}", flush=True)
for T in (9, 40):
    heads = make_heads(64, 32, widths_of("ragged", T), torch.device("cpu")).to(torch.bfloat16)
    fused = fuse_heads(copy.deepcopy(heads))
    z = torch.randn(T, 256, 64).to(torch.bfloat16).requires_grad_()
    def step(mod, params, per_task):
        def run():
            out = mod(z, per_task=True) if per_task else {t: heads[t](z[i]) for i, t in enumerate(heads)}
            flat = torch.cat(list(out.values()), -1)
            g = torch.autograd.grad(flat.float().square().sum(), [z, *params])
            return flat.detach(), g[0]
        return run
    runs = {"fused": step(fused, list(fused.parameters()), True), "loop": step(None, list(heads.parameters()), False)}
    runs["loop2"] = runs["loop"]
    ms, ratio = measure({"fused": runs["fused"], "loop": runs["loop"], "concat+bmm": runs["loop2"]}, 7, 3.0)
    print(f"{label} mlp per-task T={T} B=256: fused {ms['fused']:.2f} loop {ms['loop']:.2f} ms, ratio {ratio:.2f}", flush=True)
