"""This host's GEMMs by dtype: torch's low-precision checks, and the median time of one GEMM
in fp32, in bf16/fp16 as torch runs it, and as an fp32 GEMM of the upcast operands rounded
back (what mtlfast's heads ops do where the checks say no). One torch thread.

    python gemm_dtypes.py > gemm_dtypes.txt
"""
import platform
import statistics
import time

import torch

torch.set_num_threads(1)


def median_us(fn, reps=7):
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


model = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
              if ln.startswith("model name")), platform.processor())
family, cpu_model = (next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                           if ln.startswith(k)), "?") for k in ("cpu family", "model\t"))
flags = next(ln for ln in open("/proc/cpuinfo") if ln.startswith("flags")).split()
print(f"cpu: {model}, family {family} model {cpu_model}; "
      f"avx512 flags: {sorted(f for f in flags if f.startswith('avx512')) or 'none'}")
print(f"torch {torch.__version__}, capability {torch.backends.cpu.get_cpu_capability()}, "
      f"mkldnn bf16 {torch.ops.mkldnn._is_mkldnn_bf16_supported()}, "
      f"fp16 {torch.ops.mkldnn._is_mkldnn_fp16_supported()}")
print("| M x K x N | fp32 us | bf16 us | bf16 via fp32 us | fp16 us | fp16 via fp32 us |")
print("|---|---:|---:|---:|---:|---:|")
for m, k, n in [(32, 64, 32), (256, 64, 512), (1024, 64, 512), (1024, 256, 200)]:
    a32, b32 = torch.randn(m, k), torch.randn(k, n)
    row = [median_us(lambda: a32 @ b32)]
    for dt in (torch.bfloat16, torch.float16):
        a, b = a32.to(dt), b32.to(dt)
        row += [median_us(lambda: a @ b), median_us(lambda: (a.float() @ b.float()).to(dt))]
    print(f"| {m} x {k} x {n} | " + " | ".join(f"{t:.0f}" for t in row) + " |")
