import sys, torch
sys.path.insert(0, sys.argv[1] + "/benchmarks")
from heads_grid import contenders, measure
torch.set_num_threads(1)
r = contenders(512, 256, (1, 2, 5, 10, 20, 50, 100, 200), 256, torch.float32)
ms, ratio = measure(r, 11, 20.0)
print(sys.argv[1], {k: round(v, 2) for k, v in ms.items()}, "ratio %.2f" % ratio)
