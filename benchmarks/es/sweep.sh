#!/bin/sh
# Q and radius sweep for esj on the linear hyper-representation task (p=64, d=128, n=500), 1 seed.
# (The recorded folders are named after the option's old name, mu.)
set -e
for q in 1 4 16; do
  for radius in 0.001 0.01 0.1; do
    bilevel bench hyper_representation --methods esj --seeds 1 --threads 1 --quiet \
      -o directions=$q -o radius=$radius --out benchmarks/es/sweep/q${q}_mu${radius}
  done
done
