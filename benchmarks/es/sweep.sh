#!/bin/sh
# Q and mu sweep for esj on the linear hyper-representation task (p=64, d=128, n=500), 1 seed.
set -e
for q in 1 4 16; do
  for mu in 0.001 0.01 0.1; do
    bilevel bench hyper_representation --methods esj --seeds 1 --threads 1 --quiet \
      -o directions=$q -o mu=$mu --out benchmarks/es/sweep/q${q}_mu${mu}
  done
done
