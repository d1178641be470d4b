#!/bin/sh
# Issue 16 protocol for the Krylov family: the official settings (UCAS-YanYang/LancBiO, Code/),
# budgets in OUTER STEPS, >= 3 seeds. Timed: run alone on the machine.
#   STEPS (default 3000, full batch), MINI_STEPS (default 3000), SEEDS (default 3),
#   OUT (default benchmarks/krylov/paper). Smoke: STEPS=2 MINI_STEPS=2 SEEDS=1 OUT=/tmp/k sh ...
# Full batch (FashionMNIST hyper-cleaning 5k/5k/10k, p = 0.5 and 0.8): outer SGD 500, inner GD
# 0.1; LancBiO T = 5 with the official two-phase schedule (windowed, cap 300, for 250 steps,
# then restart/residual with m = 1 x1.3 every 50 up to 10: the task's defaults); SubBiO T = 5;
# SOBA T = 1, eta = 0.05; AmIGO-CG T = 10, Q = 5, outer lr 100; stocBiO T = Q = 10.
# Mini-batch (20k train, batch 256, p = 0.5, outer SGD 100): LancBiO the authors' windowed
# variant only (cap 30; their switch to 50 at epoch 500 is not modelled), one batch per cycle.
# The krylov_synthetic protocol with the paper's metric: benchmarks/krylov/synthetic_paper.py.
set -e
cd "$(dirname "$0")/../.."
STEPS=${STEPS:-3000}; MINI_STEPS=${MINI_STEPS:-3000}; SEEDS=${SEEDS:-3}
OUT=${OUT:-benchmarks/krylov/paper}
BENCH="python -m bilevel.cli bench hyper_cleaning --seeds $SEEDS --threads 1 --quiet -t diagnostics=true"
for p in 0.5 0.8; do
  FULL="$BENCH --steps $STEPS --log-every 10 -t corruption=$p -o inner_optimizer=gd -o inner_lr=0.1"
  D=$OUT/full_p$p
  $FULL --methods lancbio --out $D/lancbio_official --outer-optimizer sgd --outer-lr 500 \
    -o inner_steps=5 -o warmup_steps=250 -o warmup_m_max=300
  $FULL --methods subbio --out $D/subbio --outer-optimizer sgd --outer-lr 500 -o inner_steps=5 -o solver_lr=0.05
  $FULL --methods soba --out $D/soba --outer-optimizer sgd --outer-lr 500 -o inner_steps=1 -o solver_lr=0.05
  $FULL --methods amigo --out $D/amigo_cg --outer-optimizer sgd --outer-lr 100 -o inner_steps=10 -o solver_iters=5
  $FULL --methods stocbio --out $D/stocbio --outer-optimizer sgd --outer-lr 500 -o inner_steps=10 -o solver_iters=10
done
MINI="$BENCH --steps $MINI_STEPS --log-every 20 -t corruption=0.5 -t n_train=20000 -t batch_size=256 --outer-optimizer sgd --outer-lr 100 -o inner_optimizer=gd -o inner_lr=0.1 -o inner_steps=3"
D=$OUT/minibatch_p0.5
$MINI --methods lancbio --out $D/lancbio_authors_window -o window=authors -o m_max=30
$MINI --methods lancbio --out $D/lancbio_restart_held -o m_max=10
$MINI --methods subbio,soba --out $D/others -o solver_lr=0.05
$MINI --methods amigo --out $D/amigo_cg -o solver_iters=5
$MINI --methods stocbio --out $D/stocbio -o solver_iters=10
