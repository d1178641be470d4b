#!/bin/sh
# Issue 16 protocol for the ES family (sowmaster/esjacobians notebooks): hyper-representation at
# the authors' scale (-t scale=paper: N(0,1) data and weights; deep without biases, reg 0.001),
# per-method Adam learning rates of the notebooks (task.metadata["paper_outer_lr"]), budgets in
# OUTER STEPS, >= 3 seeds. Timed: run alone on the machine.
#   STEPS (default 150, the notebooks' 100-150), LONG_STEPS (default 1000), FS_STEPS (few-shot,
#   default 1000; FS_STEPS=0 skips few-shot), SEEDS (default 3), OUT (default benchmarks/es/paper),
#   KINDS (hyper-representation forms, default "linear deep"), LABELS (the runs, default all
#   seven: esj_authors esj_gaussian direct aid_fp aid_cg itd hozog), PYTHON (default python);
#   LONG_STEPS=0 skips the long runs.
#   Smoke: STEPS=2 LONG_STEPS=2 FS_STEPS=2 SEEDS=1 OUT=/tmp/e sh benchmarks/es/run_paper.sh
# Methods: ESJ with the authors' directions (sphere_per_tensor), ESJ gaussian, the direct term
# alone (ablation), AID-FP, AID-CG, ITD, HOZOG; one direction, mu 0.01 (linear) / 0.1 (deep).
# Inner: GD 1e-3 from a fixed start, N = 20 (linear) / 10 (deep; AID-CG 30 as in the notebook),
# linear solves with N iterations (the notebooks pass T to both).
set -e
cd "$(dirname "$0")/../.."
STEPS=${STEPS:-150}; LONG_STEPS=${LONG_STEPS:-1000}; FS_STEPS=${FS_STEPS:-1000}
SEEDS=${SEEDS:-3}; OUT=${OUT:-benchmarks/es/paper}; KINDS=${KINDS:-"linear deep"}
LABELS=${LABELS:-"esj_authors esj_gaussian direct aid_fp aid_cg itd hozog"}
BENCH="${PYTHON:-python} -m bilevel.cli bench --seeds $SEEDS --threads 1 --quiet --outer-optimizer adam"

# run LABEL: true when LABEL is one of the selected runs
run() { case " $LABELS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

run_kind() {  # kind steps out N lr_esj lr_cg lr_hozog N_cg
  kind=$1; steps=$2; d=$3; n=$4; lr=$5; lr_cg=$6; lr_hozog=$7; n_cg=$8
  HR="$BENCH hyper_representation -t kind=$kind -t scale=paper --steps $steps --log-every 5"
  ! run esj_authors ||
    $HR --methods esj --out $d/esj_authors --outer-lr $lr -o inner_steps=$n -o distribution=sphere_per_tensor
  ! run esj_gaussian || $HR --methods esj --out $d/esj_gaussian --outer-lr $lr -o inner_steps=$n
  ! run direct || $HR --methods direct --out $d/direct --outer-lr $lr -o inner_steps=$n
  ! run aid_fp ||
    $HR --methods fixed_point --out $d/aid_fp --outer-lr $lr -o inner_steps=$n -o solver_iters=$n
  ! run aid_cg ||
    $HR --methods cg --out $d/aid_cg --outer-lr $lr_cg -o inner_steps=$n_cg -o solver_iters=$n_cg
  ! run itd || $HR --methods itd --out $d/itd --outer-lr $lr -o inner_steps=$n
  ! run hozog || $HR --methods hozog --out $d/hozog --outer-lr $lr_hozog -o inner_steps=$n
}
for steps in $STEPS $LONG_STEPS; do
  [ "$steps" -gt 0 ] || continue
  for kind in $KINDS; do
    case $kind in
      linear) run_kind linear $steps $OUT/linear_paper_${steps}steps 20 0.05 0.05 0.1 20 ;;
      deep) run_kind deep $steps $OUT/deep_paper_${steps}steps 10 0.01 0.01 0.2 30 ;;
      *) echo "unknown kind $kind" >&2; exit 2 ;;
    esac
  done
done
# few-shot (feature form, 5-way 5-shot, conv-4; the ResNet-12 protocol is benchmarks/es/resnet12.py)
[ "$FS_STEPS" -gt 0 ] || exit 0
FS="$BENCH few_shot --steps $FS_STEPS --log-every 50 --outer-lr 1e-3"
$FS --methods esj --out $OUT/few_shot/esj_authors -o distribution=sphere_per_tensor
$FS --methods esj,direct,cg,itd --out $OUT/few_shot/others
