#!/bin/bash
# How before_after.json was measured: before = f72ae30, after = a8b4491, each a `git archive`
# of that commit (with the built mtlfast/_C*.so copied in) under $BEFORE and $AFTER; the grid
# script is benchmarks/heads_grid.py of a8b4491. The two alternate per (dtype, T) chunk so that
# load from other processes on the (shared, 2-core) machine hits both alike.
PY=${PY:-python}
for dt in fp32 bf16; do for T in 2 4 8 40; do
  PYTHONPATH=$BEFORE $PY heads_grid.py --rounds 15 --dtype $dt --T $T --out fb_${dt}_$T.json
  PYTHONPATH=$AFTER $PY heads_grid.py --rounds 15 --dtype $dt --T $T --out fa_${dt}_$T.json
done; done
