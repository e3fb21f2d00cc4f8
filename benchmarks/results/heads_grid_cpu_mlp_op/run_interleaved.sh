#!/bin/bash
# How before_after.json was measured: before = dbe0d83 (FusedHeads' ATen composition), after =
# d666501 (the mtlfast::mlp_heads C++ op), each a `git archive` of that commit with the same
# built mtlfast/_C*.so copied in, under $BEFORE and $AFTER; the grid script is
# benchmarks/heads_grid.py of d666501. The two alternate per (dtype, T) chunk so that load from
# other processes on the (shared, 2-core) machine hits both alike.
PY=${PY:-python}
for dt in fp32 bf16; do for T in 2 4 8 40; do
  PYTHONPATH=$BEFORE $PY heads_grid.py --rounds 15 --dtype $dt --T $T --out fb_${dt}_$T.json
  PYTHONPATH=$AFTER $PY heads_grid.py --rounds 15 --dtype $dt --T $T --out fa_${dt}_$T.json
done; done
