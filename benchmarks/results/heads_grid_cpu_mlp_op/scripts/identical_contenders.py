# As run (inline, session 9): two identical FusedHeads contenders in one measure() call.
import sys

import torch

sys.path.insert(0, '/work/main/benchmarks')
from heads_grid import contenders, measure

torch.set_num_threads(1)
T = 40
w = tuple((1, 200, 5, 50, 2, 100, 10, 20)[i % 8] for i in range(T))
a = contenders(64, 8, w, 256, torch.float32)
b = contenders(64, 8, w, 256, torch.float32)
ms, r = measure({"fused": a["fused"], "fused2": b["fused"], "loop": a["loop"]}, 7, 3.0)
print(ms)
