"""Median of a metric over the logged rows in the last SECONDS of each run (noisy curves).

python benchmarks/krylov/late_median.py FOLDER METRIC SECONDS
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

from bilevel.bench import collect


def main(folder: str, metric: str, window: float) -> None:
    print(f"| method | steps | median {metric} over the last {window:g} s |")
    print("|---|---|---|")
    for method, histories in sorted(collect(Path(folder)).items()):
        for rows in histories:
            end = rows[-1]["seconds"]
            late = [r[metric] for r in rows if r["seconds"] >= end - window and metric in r]
            print(f"| {method} | {rows[-1]['step']} | {statistics.median(late):.3g} |")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], float(sys.argv[3]))
