#!/bin/bash
cd /tmp/s9/grid4
PY=/work/main/.venv/bin/python
for dt in fp32 bf16; do for T in 2 4 8 40; do
  PYTHONPATH=/tmp/s9/before $PY /tmp/s9/after/benchmarks/heads_grid.py --rounds 15 --dtype $dt --T $T --out fb_${dt}_$T.json > fb_${dt}_$T.log 2>&1
  PYTHONPATH=/tmp/s9/after $PY /tmp/s9/after/benchmarks/heads_grid.py --rounds 15 --dtype $dt --T $T --out fa_${dt}_$T.json > fa_${dt}_$T.log 2>&1
done; done
echo done > /tmp/s9/grid4/DONE
