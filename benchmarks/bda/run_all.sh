#!/usr/bin/env bash
# Every recorded BDA benchmark (scaled down for a shared 2-core machine; see README.md).
set -euo pipefail
# LLS toys: step-based, timing-insensitive, so they run beside the timed benches
(python benchmarks/bda/lls_toys.py --steps 150 --dims 1 --ks 4,16,64 --out benchmarks/bda/lls_toys_1d
 python benchmarks/bda/lls_toys.py --steps 150 --dims 100 --ks 16 --out benchmarks/bda/lls_toys_100) &
bilevel bench hyper_cleaning --methods bda,itd,cg --budget 30 --seeds 3 --threads 1 \
    -t model=mlp --log-every 10 --out benchmarks/bda/hyper_cleaning_mlp
bilevel bench few_shot --methods itd --budget 30 --seeds 2 --threads 1 \
    -t k_shot=1 --log-every 25 --out benchmarks/bda/few_shot_1shot
bilevel bench few_shot --methods bda --budget 30 --seeds 2 --threads 1 \
    -t k_shot=1 -o mu=0.6 --log-every 25 --out benchmarks/bda/few_shot_1shot
wait
