#!/bin/bash
# before = a51853a (groups form's backward concatenating), after = working tree (writing into
# buffers); alternating per repetition.
cd /tmp/s10/ab
for rep in 1 2 3; do for side in before after; do
  if [ $side = before ]; then P=/tmp/s10/before; else P=/work/main; fi
  PYTHONPATH=$P /work/main/.venv/bin/python $P/benchmarks/heads_grid.py --T 2 4 --hidden 8 16 64 --widths ragged --B 32 1024 --dtype fp32 --rounds 15 --out ab_${side}_${rep}.json > ab_${side}_${rep}.log 2>&1
done; done
