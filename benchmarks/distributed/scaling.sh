#!/bin/sh
# Seconds per outer step of esj (Q = 16) on the deep hyper-representation task, 1 vs 2 ranks
# (torchrun, gloo), one thread per rank. Prints one line per run: ranks, median s/step.
set -e
OUT=${1:-benchmarks/distributed/scaling}
rm -rf "$OUT"
for n in 1 2; do
  bilevel run hyper_representation --method esj -t kind=deep -o directions=16 --steps 12 \
    --threads 1 --nproc $n --quiet --out "$OUT/ranks$n"
  python - "$OUT/ranks$n/metrics.jsonl" $n <<'PY'
import json, statistics, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
steps = [b["seconds"] - a["seconds"] for a, b in zip(rows[1:], rows[2:])]  # skip the warm-up step
print(f"ranks={sys.argv[2]} median_s_per_step={statistics.median(steps):.3f} "
      f"final_upper_loss={rows[-1]['upper_loss']:.5f}")
PY
done
