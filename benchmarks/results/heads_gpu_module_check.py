"""H200 check run of the whole FusedHeads module (record of heads_gpu_h200.json): parity with
the unfused heads in fp32/fp16/bf16 (shared and per-task inputs, task_feature_grads), then
run_heads_gpu_bench(). Run from the repo root with PYTHONPATH=. on a CUDA machine."""

import json
import os

import torch

import mtlfast
from benchmarks.bench_heads import run_heads_gpu_bench

R = {"a": 1, "b": 2, "c": 7, "d": 67}


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


errs = {}
for dt in (torch.float32, torch.float16, torch.bfloat16):
    for hid in (None, [64, 256, 3, 100]):
        for pt in (False, True):
            f = mtlfast.FusedHeads(24, R, hidden=hid, activation="gelu", device="cuda", dtype=dt)
            p = f.unfuse()
            z = torch.randn(4, 300, 24, device="cuda", dtype=dt, requires_grad=True)
            o = f(z, per_task=True) if pt else f(z[0])
            r = {t: p[t](z[i] if pt else z[0]) for i, t in enumerate(R)}
            s = {t: torch.randn_like(v) for t, v in o.items()}
            g1 = torch.autograd.grad([o[t] for t in R], [z, *f.parameters()], [s[t] for t in R])
            g2 = torch.autograd.grad([r[t] for t in R], [z], [s[t] for t in R], retain_graph=True)
            e = max(rel(o[t], r[t]) for t in R)
            e = max(e, rel(g1[0], g2[0]))
            zz = z.detach() if pt else z.detach()[0]
            J = f.task_feature_grads(s, zz, per_task=pt)
            for i, t in enumerate(R):
                ref = torch.autograd.grad(r[t], z, s[t], retain_graph=True)[0]
                e = max(e, rel(J[i], ref[i] if pt else ref[0]))
            errs[f"{dt}-{'mlp' if hid else 'lin'}-pt{pt}"] = e
res = {"parity_max_rel_err": errs, "bench": run_heads_gpu_bench()}
print(json.dumps(res, indent=1))
json.dump(res, open(os.environ["OUT"] + "/heads_gpu.json", "w"), indent=1)
