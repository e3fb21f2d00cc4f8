"""Standalone GPU smoke check of the grouped Triton kernels (record of the run in
heads_kernels_h200.json): errors vs a float64 loop reference, and forward timings."""
# ruff: noqa: B023, B905  (kept as run on the GPU: lambdas are timed inside their loop turn)

import json
import sys

import torch

sys.path.insert(0, "/tmp/gk")
import grouped_mm as g


def bs(i, o):
    return [n * k for n, k in zip(o, i)]


def ref_fwd(x, w, b, i, o, pt, act):
    W = [t.view(n, k) for t, n, k in zip(w.split(bs(i, o)), o, i)]
    xs = list(x.unbind(0)) if pt else list(x.split(list(i), 1))
    y = torch.cat(
        [torch.nn.functional.linear(a, c, d) for a, c, d in zip(xs, W, b.split(list(o)))], 1
    )
    return {
        "relu": torch.relu,
        "gelu": torch.nn.functional.gelu,
        "silu": torch.nn.functional.silu,
        "none": lambda t: t,
    }[act](y)


def ref_ig(gy, w, i, o, pt):
    W = [t.view(n, k) for t, n, k in zip(w.split(bs(i, o)), o, i)]
    p = [a @ c for a, c in zip(gy.split(list(o), 1), W)]
    return torch.stack(p) if pt else torch.cat(p, 1)


def ref_wg(gy, x, i, o, pt):
    xs = list(x.unbind(0)) if pt else list(x.split(list(i), 1))
    return torch.cat([(a.T @ c).reshape(-1) for a, c in zip(gy.split(list(o), 1), xs)])


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


res = {"device": torch.cuda.get_device_name(), "errors": {}, "times_ms": {}}
S = [
    ((5, 17, 1, 70), (1, 33, 2, 65), False),
    ((64,) * 100, (1,) * 100, False),
    ((512,), (2048,), False),
    ((24,) * 4, (1, 33, 2, 65), True),
]
for dt in (torch.float32, torch.float16, torch.bfloat16):
    for i, o, pt in S:
        for M in (1, 300):
            x = (torch.randn(len(i), M, i[0]) if pt else torch.randn(M, sum(i))).cuda()
            w = (torch.randn(sum(bs(i, o))) / max(i) ** 0.5).cuda()
            b = torch.randn(sum(o)).cuda()
            gy = torch.randn(M, sum(o)).cuda()
            X, Wd, B, G = (t.to(dt) for t in (x, w, b, gy))
            y, pre = g.grouped_linear_triton(X, Wd, B, tuple(i), tuple(o), pt, "gelu", True)
            e = [
                rel(y, ref_fwd(X.double(), Wd.double(), B.double(), i, o, pt, "gelu")),
                rel(pre, ref_fwd(X.double(), Wd.double(), B.double(), i, o, pt, "none")),
                rel(
                    g.grouped_input_grad_triton(G, Wd, tuple(i), tuple(o), pt),
                    ref_ig(G.double(), Wd.double(), i, o, pt),
                ),
                rel(
                    g.grouped_weight_grad_triton(G, X, tuple(i), tuple(o), pt),
                    ref_wg(G.double(), X.double(), i, o, pt),
                ),
            ]
            res["errors"][f"{dt}-{len(i)}g-{pt}-M{M}"] = max(e)


def tm(f, r=50):
    for _ in range(5):
        f()
    s = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
    ts = []
    for _ in range(r):
        s[0].record()
        f()
        s[1].record()
        torch.cuda.synchronize()
        ts.append(s[0].elapsed_time(s[1]))
    return sorted(ts)[len(ts) // 2]


for name, (i, o) in {
    "ranking_l2": ((64,) * 100, (1,) * 100),
    "mlp8_l2": ((256,) * 8, (1, 2, 5, 10, 20, 50, 100, 200)),
}.items():
    M = 1024 if name.startswith("rank") else 256
    x = torch.randn(M, sum(i), device="cuda")
    w = torch.randn(sum(bs(i, o)), device="cuda")
    b = torch.randn(sum(o), device="cuda")
    W = [t.view(n, k) for t, n, k in zip(w.split(bs(i, o)), o, i)]
    xs = x.split(list(i), 1)
    bb = b.split(list(o))
    nm = max(o)
    Wp = torch.zeros(len(i), i[0], nm, device="cuda")
    res["times_ms"][name] = {
        "triton": tm(lambda: g.grouped_linear_triton(x, w, b, i, o, False, "none", False)),
        "loop": tm(lambda: torch.cat([torch.addmm(c, a, d.T) for a, d, c in zip(xs, W, bb)], 1)),
        "padded_bmm": tm(lambda: torch.bmm(x.view(M, len(i), -1).transpose(0, 1), Wp)),
    }
x = torch.randn(1024, 256, device="cuda")
w = torch.randn(6400 * 256, device="cuda")
b = torch.randn(6400, device="cuda")
res["times_ms"]["l1_relu_1024x256x6400"] = {
    "triton": tm(lambda: g.grouped_linear_triton(x, w, b, (256,), (6400,), False, "relu", False)),
    "addmm_relu": tm(lambda: torch.relu_(torch.addmm(b, x, w.view(6400, 256).T))),
}
print(json.dumps(res, indent=1))
