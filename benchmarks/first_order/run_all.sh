#!/bin/sh
# Hessian-free comparison: ESJ (gaussian and sphere_per_tensor directions; ESJ-S, the same
# estimator under its stochastic name, in the mini-batch setting), F2SA, BOME and HOZOG, with
# AID-CG and ITD as references, on three settings, SEEDS seeds, BUDGET seconds per run, one
# thread. Each method (variant) is one `bilevel bench` call into SETTING/LABEL; summarize.py
# then merges the labels of a setting into one table and plots against outer steps,
# gradient-oracle calls and CPU seconds.
#
#   sh benchmarks/first_order/run_all.sh                       # the timed run (63 runs of 60 s + start-up: ~1.5 h)
#   STEPS=3 SEEDS=1 ROOT=/tmp/fo sh benchmarks/first_order/run_all.sh   # smoke run
set -e
cd "$(dirname "$0")/../.."
ROOT=${ROOT:-benchmarks/first_order}
SEEDS=${SEEDS:-3}
BILEVEL=${BILEVEL:-bilevel}
PYTHON=${PYTHON:-python}
if [ -n "$STEPS" ]; then LIMIT="--steps $STEPS"; else LIMIT="--budget ${BUDGET:-60}"; fi

# bench SETTING LABEL TASK METHOD [options...]; a label with its table is kept and one
# without (an interrupted run_all) is resumed, so a rerun goes on where the last one stopped
bench() {
  setting=$1 label=$2 task=$3 method=$4
  shift 4
  out="$ROOT/$setting/$label"
  [ -f "$out/table.md" ] && return 0
  RESUME=""
  [ -f "$out/bench.yaml" ] && RESUME="--resume"
  $BILEVEL bench "$task" --methods "$method" --out "$out" --seeds "$SEEDS" \
    --threads 1 --quiet $LIMIT $RESUME "$@"
}

# the settings: task options, log period, BOME's y step (the task's inner step for cleaning; a
# 30-step probe of 1e-3 / 1e-2 on hyper-representation, whose inner step is 1e-3)
for setting in hyper_representation cleaning_full cleaning_minibatch; do
  case $setting in
    hyper_representation) TASK=hyper_representation; TOPT=""; LOG=5; YLR=0.01 ;;
    cleaning_full) TASK=hyper_cleaning; TOPT=""; LOG=10; YLR=0.1 ;;
    cleaning_minibatch) TASK=hyper_cleaning; TOPT="-t n_train=20000 -t batch_size=256"; LOG=10; YLR=0.1 ;;
  esac
  ESJ=esj
  [ $setting = cleaning_minibatch ] && ESJ=esj_s
  bench $setting ${ESJ}_gaussian $TASK $ESJ --log-every $LOG $TOPT -o distribution=gaussian
  bench $setting ${ESJ}_sphere $TASK $ESJ --log-every $LOG $TOPT -o distribution=sphere_per_tensor
  bench $setting hozog $TASK hozog --log-every $LOG $TOPT
  # F2SA and BOME carry their iterates across outer steps by design (the papers), also where
  # the task restarts the other methods' inner loops (hyper_representation: warm_start=false)
  bench $setting f2sa $TASK f2sa --log-every $LOG $TOPT -o warm_start=true
  bench $setting bome $TASK bome --log-every $LOG $TOPT -o warm_start=true -o y_lr=$YLR
  bench $setting cg $TASK cg --log-every $LOG $TOPT
  bench $setting itd $TASK itd --log-every $LOG $TOPT
  $PYTHON benchmarks/first_order/summarize.py "$ROOT/$setting"
done
