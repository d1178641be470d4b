#!/bin/sh
# Issue 17 protocol for SGLD robustness: sgld against itd, cg and neumann in the baselines'
# fragile regimes, on digits hyper-cleaning (p = 0.5), STEPS outer steps, SEEDS seeds, one
# process per grid (benchmarks/langevin/robustness.py; one JSON line per run, then the table).
# Every method: plain GD inner steps (sgld: Langevin steps of the same size), the grid's inner
# step also as Neumann's step (--tie-solver-lr); sgld: τ = 1/N from the N training samples
# (--temperature-rule data_size), burn-in BURN_IN steps per outer step, and test accuracy both at
# the mean weights and averaged over its last KEEP chain samples. A run fails when it diverges
# or ends below the naive reference of its seed (the model trained on every corrupted sample).
# The digits lower loss has L ≈ 1.2 (linear model), so 2/L ≈ 1.67: the lrs straddle it.
#
#   linear      linear model, full batch: lr 0.5 1.0 1.6 2.0 3.0, K = 1 2 10
#   mlp         over-parameterised MLP head: 64-100-10 (7,510 weights) on 600 samples, no weight
#               decay: lr 0.3 1.0 2.0 3.0, K = 1 2 10
#   minibatch   linear model, noisy batches of 32: lr 0.5 1.0 1.6 2.0, K = 1 2 10
#
# The control for sgld's chain average: the deterministic methods' predictions averaged over
# their last AVERAGE_LAST outer steps' iterates, written to GRID_averaged.txt (same runs, seeded:
# the final accuracies must match GRID.txt; benchmarks/langevin/summarize.py checks it):
#   METHODS=itd,cg,neumann AVERAGE_LAST=50 sh benchmarks/langevin/run_robustness.sh
# Variants: TASK_EXTRA adds task options, EXTRA adds robustness.py arguments, SUFFIX names the
# files (a suffix without "_" is a grid of its own for summarize.py), e.g. a colder sgld on the
# MLP grid (an explicit temperature wins over the data-size rule):
#   GRIDS=mlp METHODS=sgld EXTRA="-o sgld.temperature=1e-5" SUFFIX=-tau1e-5 sh ...
#
#   sh benchmarks/langevin/run_robustness.sh                          # the timed run (README)
#   STEPS=3 SEEDS=1 ROOT=/tmp/rob GRIDS=linear sh benchmarks/langevin/run_robustness.sh  # smoke
set -e
cd "$(dirname "$0")/../.."
STEPS=${STEPS:-500}; SEEDS=${SEEDS:-5}; BURN_IN=${BURN_IN:-5}; KEEP=${KEEP:-50}
ROOT=${ROOT:-benchmarks/langevin/robustness}
GRIDS=${GRIDS:-"linear mlp minibatch"}
PYTHON=${PYTHON:-python}
METHODS=${METHODS:-sgld,itd,cg,neumann}
AVERAGE_LAST=${AVERAGE_LAST:-0}
SUFFIX=${SUFFIX:-$([ "$AVERAGE_LAST" -gt 0 ] && echo _averaged)}
mkdir -p "$ROOT"
for grid in $GRIDS; do
  case $grid in
    linear) LRS="0.5 1.0 1.6 2.0 3.0"; TASK="dataset=digits" ;;
    mlp) LRS="0.3 1.0 2.0 3.0"; TASK="dataset=digits,model=mlp,hidden=100,n_train=600,weight_decay=0" ;;
    minibatch) LRS="0.5 1.0 1.6 2.0"; TASK="dataset=digits,batch_size=32" ;;
    *) echo "unknown grid $grid" >&2; exit 2 ;;
  esac
  [ -z "$TASK_EXTRA" ] || TASK="$TASK,$TASK_EXTRA"
  $PYTHON benchmarks/langevin/robustness.py hyper_cleaning "$STEPS" "$LRS" "1 2 10" "$SEEDS" \
    "$TASK" --methods "$METHODS" -o inner_optimizer=gd --tie-solver-lr \
    --threshold naive --temperature-rule data_size --keep-samples "$KEEP" \
    --average-last "$AVERAGE_LAST" -o sgld.burn_in="$BURN_IN" $EXTRA > "$ROOT/$grid$SUFFIX.txt"
done
