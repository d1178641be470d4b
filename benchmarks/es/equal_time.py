"""Median of one metric of each method at given seconds and at one outer step, from a bench
folder's metrics.jsonl files, and the seconds per outer step.

Usage: python benchmarks/es/equal_time.py FOLDER [SECONDS ...] [--cpu] [--metric NAME]
       [--step N]

FOLDER is one ``bilevel bench --out`` folder (runs in FOLDER/METHOD-sSEED) or a setting of a
``run_paper.sh`` (runs in FOLDER/LABEL/METHOD-sSEED, named by LABEL). ``--cpu`` reads the
marks and the per-step cost as CPU seconds (process time) instead of wall seconds; ``--metric``
(default upper_loss) is any logged column, ``--step`` (default 20) the outer-step mark. A run
is read at the last logged row at or before a mark; one that has not reached the mark yet is
left out of the median there.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def value_at(rows: list[dict], metric: str, key: str, mark: float) -> float | None:
    """``metric`` of the last row with ``key`` <= mark (None before the first such row)."""
    seen = [r[metric] for r in rows if r[key] <= mark]
    return seen[-1] if seen else None


def load(folder: Path, metric: str) -> dict[str, list[list[dict]]]:
    """Histories (rows that log ``metric``) per method (flat folder) or per label (a setting)."""
    runs: dict[str, list[list[dict]]] = {}
    paths = sorted(folder.glob("*-s*/metrics.jsonl")) or sorted(folder.glob("*/*-s*/metrics.jsonl"))
    methods_of: dict[Path, set[str]] = {}  # a label's methods
    for path in paths:
        method = path.parent.name.rsplit("-s", 1)[0]
        methods_of.setdefault(path.parent.parent, set()).add(method)
    for path in paths:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        rows = [r for r in rows if metric in r]
        method, label = path.parent.name.rsplit("-s", 1)[0], path.parent.parent
        name = method
        if label != folder:  # a label: named by it, and by the method if it holds two
            name = label.name if len(methods_of[label]) == 1 else f"{label.name} {method}"
        runs.setdefault(name, []).append(rows)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("seconds", type=float, nargs="*", default=[2.0, 5.0, 10.0])
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--metric", default="upper_loss")
    parser.add_argument("--step", type=int, default=20)
    args = parser.parse_args()
    clock = "cpu_seconds" if args.cpu else "seconds"
    unit = "CPU s" if args.cpu else "s"
    name = "loss" if args.metric == "upper_loss" else args.metric
    header = [f"{name} @ {m:g} {unit}" for m in args.seconds]
    header += [f"{name} @ step {args.step}", f"{unit} / step"]
    print("| method | " + " | ".join(header) + " |")
    print("|---" * (len(header) + 1) + "|")
    marks = [(clock, m) for m in args.seconds] + [("step", args.step)]
    for method, histories in load(args.folder, args.metric).items():
        cells = []
        for key, mark in marks:
            values = [value_at(h, args.metric, key, mark) for h in histories]
            values = [v for v in values if v is not None]
            cells.append(f"{statistics.median(values):.4g}" if values else "—")
        per_step = statistics.median(h[-1][clock] / h[-1]["step"] for h in histories)
        cells.append(f"{per_step:.4f}")
        print(f"| {method} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
