"""Median upper loss of each method at given wall-clock seconds and outer steps, from a bench
folder's metrics.jsonl files. Usage: python benchmarks/es/equal_time.py FOLDER [SECONDS ...]"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def loss_at(rows: list[dict], key: str, value: float) -> float | None:
    """Upper loss of the last row with ``key`` <= value (None before the first row)."""
    seen = [r["upper_loss"] for r in rows if r[key] <= value]
    return seen[-1] if seen else None


def main() -> None:
    folder, marks = Path(sys.argv[1]), [float(s) for s in sys.argv[2:]] or [2.0, 5.0, 10.0]
    runs: dict[str, list[list[dict]]] = {}
    for path in sorted(folder.glob("*-s*/metrics.jsonl")):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        rows = [r for r in rows if "upper_loss" in r]
        runs.setdefault(path.parent.name.rsplit("-s", 1)[0], []).append(rows)
    header = [f"loss @ {m:g} s" for m in marks] + ["loss @ step 20", "s / step"]
    print("| method | " + " | ".join(header) + " |")
    print("|---" * (len(header) + 1) + "|")
    for method, histories in runs.items():
        cells = []
        for key, mark in [("seconds", m) for m in marks] + [("step", 20)]:
            values = [v for h in histories if (v := loss_at(h, key, mark)) is not None]
            cells.append(f"{statistics.median(values):.4g}" if values else "—")
        per_step = statistics.median(h[-1]["seconds"] / h[-1]["step"] for h in histories)
        cells.append(f"{per_step:.3f}")
        print(f"| {method} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
