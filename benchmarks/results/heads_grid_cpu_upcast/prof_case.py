import torch, sys
torch.set_num_threads(1)
from benchmarks.heads_grid import contenders
T, hid, B = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
w = (1, 200, 5, 50, 2, 100, 10, 20)
runs = contenders(64, hid, tuple(w[i % 8] for i in range(T)), B, torch.float32)
from torch.profiler import profile, ProfilerActivity
for name in ("fused", "loop"):
    fn = runs[name]
    for _ in range(20): fn()
    with profile(activities=[ProfilerActivity.CPU]) as p:
        for _ in range(50): fn()
    print("=====", name)
    print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=14))
