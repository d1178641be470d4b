"""Median over seeds, at one logged outer step, of test accuracy, residual and seconds per step.

python benchmarks/krylov/at_step.py FOLDER STEP
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

from bilevel.bench import collect


def main(folder: str, step: int) -> None:
    print(
        "| method | seeds | test accuracy % | residual | seconds per step |\n|---|---|---|---|---|"
    )
    for method, histories in sorted(collect(Path(folder)).items()):
        rows = [r for rows in histories for r in rows if r["step"] == step]
        if not rows:
            continue
        acc = statistics.median(r["test_accuracy"] for r in rows)
        res = statistics.median(r["residual"] for r in rows)
        sec = statistics.median(r["seconds"] / step for r in rows)
        print(f"| {method} | {len(rows)} | {acc:.2f} | {res:.3g} | {sec:.3f} |")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
