#!/usr/bin/env bash
# ONE command for a bare GPU machine (no network), run from the repository root:
#
#     bash benchmarks/gpu_check.sh            # report in ./gpu-report/ (MTLFAST_GPU_REPORT)
#
# 1. builds mtlfast._C in place for this GPU's architecture and checks it has CUDA kernels,
# 2. runs the CUDA tests (pytest -m cuda; JUnit XML), and after the step and ops suites every
#    Triton test file on the GPU (a test file mentioning Triton is picked up, e.g.
#    tests/ops/test_mixture.py and tests/arch/test_triton.py),
# 3. runs the benchmark suites on the GPU, one step each (python -m mtlfast bench --device cuda
#    --quick --suite S --out REPORT/bench_S), most telling first: step (the whole training step
#    of a ResNet-18-style CelebA model with 40 heads, a NYUv2-like encoder-decoder with 3
#    pixel-wise tasks and a ranking MLP with 8 objectives, UPGrad / PCGrad / MGDA: mtlfast's
#    three modes and its CUDA-graph replay vs the per-task loop, torchjd and sum().backward(),
#    with peak memory), ops (copy bandwidth, gram / combine / graddrop vs torch in float32
#    and bfloat16, each solver kernel vs its torch path, the mixtures), then the Triton tests,
#    heads (fused vs loop vs concat+bmm), methods (every method vs torchjd, the floor and
#    PCGrad's pairwise loop, up to T=8 P=1e8), arch (fused MMoE / PLE vs their loops),
#    weights (the T x T solves vs torchjd), and last benchmarks/heads_op_device.py
#    (FusedHeads with its C++ heads op forced on the GPU); each contender checked equal first,
# 4. writes gpu_report.json + gpu_report.md (benchmarks/gpu_report.py: environment, step exit
#    codes, test summaries, pass/fail table with the floor and speed targets, benchmark
#    table) to the report folder; with $OUT set (the device tool's folder), packs the folder
#    into $OUT after every step.
# Every step has its own time limit inside a total budget (MTLFAST_GPU_BUDGET seconds,
# default 390: with the machine's start, a 15-minute lease leaves room for a rerun); a
# failing step is recorded and the next one still runs. Nothing here changes a GPU setting.
# Exit status: 0 when every check passed, 1 otherwise.
set -u
cd "$(dirname "$0")/.."
REPORT="${MTLFAST_GPU_REPORT:-$PWD/gpu-report}"
mkdir -p "$REPORT"
: > "$REPORT/steps.tsv"
# Where the device tool collects files ($OUT, at most 8 files come back): after every step the
# whole report folder as one archive, and the report itself, so that a run stopped from
# outside still brings back every step that finished.
pack() {
  [ -n "${OUT:-}" ] && [ "$OUT" != "$REPORT" ] || return 0
  mkdir -p "$OUT"
  tar czf "$OUT/gpu_check.tar.gz.part" -C "$REPORT" . && mv "$OUT/gpu_check.tar.gz.part" "$OUT/gpu_check.tar.gz"
  for f in gpu_report.md gpu_report.json; do
    if [ -f "$REPORT/$f" ]; then cp "$REPORT/$f" "$OUT/"; fi
  done
}
BUDGET="${MTLFAST_GPU_BUDGET:-390}"
START=$(date +%s)
PY="${PYTHON:-python}"
# mtlfast is built in place, not installed: the scripts import it from this checkout.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# step NAME LIMIT_SECONDS CMD... : runs CMD with the smaller of LIMIT and the budget left.
step() {
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - ($(date +%s) - START)))
  if [ "$left" -lt 20 ]; then
    echo "== $name: skipped, total budget spent"
    printf '%s\t%s\t%s\n' "$name" 125 0 >> "$REPORT/steps.tsv"
    return 125
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (limit ${limit}s)"
  local t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$REPORT/$name.log" 2>&1
  local rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$(($(date +%s) - t0))" >> "$REPORT/steps.tsv"
  pack
  tail -n 5 "$REPORT/$name.log"
  echo "== $name: rc=$rc ($(($(date +%s) - t0)) s)"
  return $rc
}

nvidia-smi > "$REPORT/nvidia-smi.txt" 2>&1
CAP=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n1 | tr -d ' .')
export MTLFAST_CUDA_ARCHS="${MTLFAST_CUDA_ARCHS:-${CAP:-90}}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"

# Test-only packages the bare GPU image lacks (torchjd, quadprog, qpsolvers for the
# cross-check tests) travel as wheels in benchmarks/wheels: installed without network.
if ls benchmarks/wheels/*.whl > /dev/null 2>&1; then
  step test_wheels 60 "$PY" -m pip install --no-index --no-deps --quiet benchmarks/wheels/*.whl
fi
step build 240 "$PY" setup.py build_ext --inplace
step cuda_kernels_present 60 "$PY" -c "
from mtlfast import _ext
import json, sys
info = _ext.info()
print(json.dumps(info, indent=1, default=str))
sys.exit(0 if info['cuda_kernels'] and info['cuda_available'] else 'FAIL: mtlfast._C has no CUDA kernels or no GPU is visible')
" || echo "!!!!! FAIL: the extension has no CUDA kernels; CUDA tests will skip and benchmarks run torch only"

step pytest_cuda 100 "$PY" -m pytest tests -m cuda -q -rfE -p no:cacheprovider \
  --junitxml="$REPORT/pytest_cuda.xml"

bench() {  # bench SUITE LIMIT
  step "bench_$1" "$2" "$PY" -m mtlfast bench --device cuda --quick --suite "$1" \
    --out "$REPORT/bench_$1"
}

# Most telling first: what no longer fits the budget is what gets skipped. The whole training
# step on the three named models (issue 14's proof) right after the CUDA tests.
bench step 120
bench ops 60
TRITON_TESTS=$(grep -rl --include='test_*.py' -i 'triton' tests 2>/dev/null | sort | tr '\n' ' ')
if [ -n "$TRITON_TESTS" ]; then
  # conftest.py sets TRITON_INTERPRET only without a GPU: here the kernels compile for the GPU.
  step pytest_triton 80 "$PY" -m pytest $TRITON_TESTS -q -rfE -p no:cacheprovider \
    --junitxml="$REPORT/pytest_triton.xml"
else
  echo "== pytest_triton: no test file mentions Triton"
fi
bench heads 30
bench methods 45
bench arch 30
bench weights 20
# last, so it displaces none of the above: the C++ heads op (CPU-only by its dispatch rule)
# forced on the GPU, should CUDA take it?
step heads_op_device 40 "$PY" benchmarks/heads_op_device.py --device cuda \
  --out "$REPORT/heads_op_device"
"$PY" benchmarks/gpu_report.py --out "$REPORT"
RC=$?
pack
echo "== report: $REPORT/gpu_report.md ($(($(date +%s) - START)) s in all)"
exit $RC
