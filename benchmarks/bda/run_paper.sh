#!/bin/sh
# Issue 17 protocol for BDA: ITD, CG and BDA (reverse, truncated to K/4, one-stage) at EQUAL
# OUTER STEPS, SEEDS seeds, one thread; each method (variant) is one `bilevel bench` call into
# SETTING/LABEL, then benchmarks/first_order/summarize.py merges a setting into SETTING/table.md
# (steps, seconds, metrics, first-order / second-order / evaluation oracle calls; median [IQR]
# over seeds) and SETTING/METRIC.png (against outer steps, oracle calls and seconds).
#
# No validation leakage: every method re-initialises y every outer step (warm_start=false: the
# inner loop starts from the task's y0, the seeded initial network), so BDA's f-term, which
# steps y along the validation loss inside the inner loop, cannot accumulate across outer steps
# into the evaluated model. (Within one outer step y_K still carries the f-term's share
# Π(1 − α_k s_u); see README.md.) Plain GD inner steps, the BOML reference's inner SGD lr 0.4 and
# outer Adam 1e-3; the reference runs 3000 outer steps.
#
# Settings:
#   cleaning      FashionMNIST hyper-cleaning, p = 0.5, 5k/5k, MLP 784-300-10 inner model
#   cleaning_linear  the same data with the linear 785x10 inner model and K = 5 (the authors'
#                 code's K; the spec allows MLP or linear), no weight decay (softmax's class-shift
#                 directions leave the lower level's minimisers a set)
#   overparam     an over-parameterised lower level: digits hyper-cleaning, MLP 64-100-10
#                 (7,510 weights) on 300 training samples, no weight decay (many inner minima)
#   few_shot16    5-way 1-shot glyphs, meta-feature form, meta-batch 16 (the papers' size)
#   lls_toy_100   the n = 100 LLS toy at 2000 outer steps, K = 16 (deterministic: no seeds)
#   overparam_refit  overparam with refit_test_accuracy logged (the accuracy of x alone: y fitted
#                 to the weighted training loss, no validation labels; docs/tasks/hyper_cleaning.md)
#
#   sh benchmarks/bda/run_paper.sh                                  # the timed run (see README)
#   STEPS=2 FEW_STEPS=2 TOY_STEPS=2 SEEDS=1 K=2 ROOT=/tmp/bda sh benchmarks/bda/run_paper.sh  # smoke
#
# Variables: STEPS (cleaning and overparam outer steps, default 3000), K (inner steps, default
# 20), FEW_STEPS (few-shot outer steps, default 1000: the task's), TOY_STEPS (default 2000),
# SEEDS (default 3), ROOT (default benchmarks/bda/paper), SETTINGS (default the first four),
# LABELS (the runs of a setting, default all five: itd cg bda_reverse bda_truncated
# bda_onestage), BILEVEL / PYTHON (the commands).
set -e
cd "$(dirname "$0")/../.."
ROOT=${ROOT:-benchmarks/bda/paper}
STEPS=${STEPS:-3000}; K=${K:-20}; FEW_STEPS=${FEW_STEPS:-1000}; TOY_STEPS=${TOY_STEPS:-2000}
SEEDS=${SEEDS:-3}
SETTINGS=${SETTINGS:-"cleaning overparam few_shot16 lls_toy_100"}
LABELS=${LABELS:-"itd cg bda_reverse bda_truncated bda_onestage"}
BILEVEL=${BILEVEL:-bilevel}
PYTHON=${PYTHON:-python}
TRUNCATE=$(( K / 4 > 0 ? K / 4 : 1 ))

# bench SETTING LABEL TASK METHOD [options...]
bench() {
  setting=$1 label=$2 task=$3 method=$4
  shift 4
  $BILEVEL bench "$task" --methods "$method" --out "$ROOT/$setting/$label" --seeds "$SEEDS" \
    --threads 1 --quiet "$@"
}

# run LABEL: true when LABEL is one of the selected runs
run() { case " $LABELS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

# the five methods of one setting (those in LABELS), with the setting's options
methods() {
  setting=$1 task=$2 trunc=$3
  shift 3
  ! run itd || bench "$setting" itd "$task" itd "$@"
  ! run cg || bench "$setting" cg "$task" cg "$@"
  ! run bda_reverse || bench "$setting" bda_reverse "$task" bda "$@"
  ! run bda_truncated ||
    bench "$setting" bda_truncated "$task" bda -o mode=truncated -o truncate="$trunc" "$@"
  ! run bda_onestage || bench "$setting" bda_onestage "$task" bda -o mode=onestage "$@"
  $PYTHON benchmarks/first_order/summarize.py "$ROOT/$setting"
}

REFERENCE="-o inner_optimizer=gd -o inner_lr=0.4 -o warm_start=false -o inner_steps=$K \
  --outer-optimizer adam --outer-lr 1e-3 --steps $STEPS"
for setting in $SETTINGS; do
  case $setting in
    cleaning)
      methods cleaning hyper_cleaning $TRUNCATE $REFERENCE --log-every 50 -t model=mlp ;;
    cleaning_linear)
      methods cleaning_linear hyper_cleaning 1 -o inner_optimizer=gd -o inner_lr=0.4 \
        -o warm_start=false -o inner_steps=5 --outer-optimizer adam --outer-lr 1e-3 \
        --steps "$STEPS" --log-every 50 -t model=linear -t weight_decay=0 ;;
    overparam | overparam_refit)
      refit=$([ "$setting" = overparam_refit ] && echo "-t refit_accuracy=true" || true)
      methods "$setting" hyper_cleaning $TRUNCATE $REFERENCE --log-every 50 -t dataset=digits \
        -t model=mlp -t hidden=100 -t n_train=300 -t n_val=600 -t weight_decay=0 $refit ;;
    few_shot16)
      # the task's inner settings (K = 5 GD steps of 0.1 on a fresh head per episode)
      methods few_shot16 few_shot 1 --steps $FEW_STEPS --log-every 50 -t k_shot=1 \
        -t meta_batch=16 -o inner_optimizer=gd ;;
    lls_toy_100)
      $PYTHON benchmarks/bda/lls_toys.py --steps $TOY_STEPS --log-every 20 --dims 100 --ks 16 \
        --out "$ROOT/lls_toy_100" ;;
    *) echo "unknown setting $setting" >&2; exit 2 ;;
  esac
done
