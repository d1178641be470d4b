"""Median upper loss of each method at given seconds and at outer step 20, from a bench folder's
metrics.jsonl files, and the seconds per outer step.

Usage: python benchmarks/es/equal_time.py FOLDER [SECONDS ...] [--cpu]

FOLDER is one ``bilevel bench --out`` folder (runs in FOLDER/METHOD-sSEED) or a setting of
``run_paper.sh`` (runs in FOLDER/LABEL/METHOD-sSEED, named by LABEL). ``--cpu`` reads the
marks and the per-step cost as CPU seconds (process time) instead of wall seconds.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def loss_at(rows: list[dict], key: str, value: float) -> float | None:
    """Upper loss of the last row with ``key`` <= value (None before the first row)."""
    seen = [r["upper_loss"] for r in rows if r[key] <= value]
    return seen[-1] if seen else None


def load(folder: Path) -> dict[str, list[list[dict]]]:
    """Histories per method (flat folder) or per label (a run_paper.sh setting)."""
    runs: dict[str, list[list[dict]]] = {}
    paths = sorted(folder.glob("*-s*/metrics.jsonl")) or sorted(folder.glob("*/*-s*/metrics.jsonl"))
    for path in paths:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        rows = [r for r in rows if "upper_loss" in r]
        nested = path.parent.parent != folder
        name = path.parent.parent.name if nested else path.parent.name.rsplit("-s", 1)[0]
        runs.setdefault(name, []).append(rows)
    return runs


def main() -> None:
    args = [a for a in sys.argv[1:] if a != "--cpu"]
    clock = "cpu_seconds" if "--cpu" in sys.argv[1:] else "seconds"
    folder, marks = Path(args[0]), [float(s) for s in args[1:]] or [2.0, 5.0, 10.0]
    unit = "CPU s" if clock == "cpu_seconds" else "s"
    header = [f"loss @ {m:g} {unit}" for m in marks] + ["loss @ step 20", f"{unit} / step"]
    print("| method | " + " | ".join(header) + " |")
    print("|---" * (len(header) + 1) + "|")
    for method, histories in load(folder).items():
        cells = []
        for key, mark in [(clock, m) for m in marks] + [("step", 20)]:
            values = [v for h in histories if (v := loss_at(h, key, mark)) is not None]
            cells.append(f"{statistics.median(values):.4g}" if values else "—")
        per_step = statistics.median(h[-1][clock] / h[-1]["step"] for h in histories)
        cells.append(f"{per_step:.4f}")
        print(f"| {method} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
