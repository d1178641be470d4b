"""Break robustness grids down by inner step size: failure rates per method and lr, also judged
by averaged predictions (sgld's chain, the others' last iterates) instead of the final weights.

Usage: python benchmarks/langevin/summarize.py benchmarks/langevin/robustness/GRID.txt ...

Reads the JSON lines written by ``robustness.py`` (the table lines are skipped) and prints, per
file, one markdown table: for each method and inner step size, failures / runs (a failure is a
divergence or a final test accuracy below the run's threshold) and the median accuracy of the
runs that finished; where a run recorded an averaged prediction (sgld's chain average, the
other methods' average over their last iterates) also the same counts judged by it.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from typing import Any

# sgld's chain average (--keep-samples) and the other methods' last-iterate average
# (--average-last), the names the table gives them
AVERAGES = {"chain_test": "chain average", "average_test": "iterate average"}


def load_runs(path: str) -> list[dict[str, Any]]:
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.startswith("{")]


def failed(run: dict[str, Any], key: str) -> bool:
    value = run.get(key)
    return value is None or value < run["threshold"]


def cell(runs: list[dict[str, Any]], key: str) -> str:
    failures = sum(failed(run, key) for run in runs)
    finished = [run[key] for run in runs if run.get(key) is not None]
    median = f"{statistics.median(finished):.1f}" if finished else "–"
    return f"{failures}/{len(runs)} ({median})"


def table(runs: list[dict[str, Any]]) -> str:
    groups: dict[tuple[str, float], list[dict[str, Any]]] = defaultdict(list)
    for run in runs:
        groups[(run["method"], run["lr"])].append(run)
    lrs = sorted({lr for _, lr in groups})
    methods = list(dict.fromkeys(run["method"] for run in runs))
    rows = ["| method | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |"]
    rows.append("|---" * (len(lrs) + 1) + "|")
    for method in methods:
        mine = [run for run in runs if run["method"] == method]
        keys = ["test"] + [key for key in AVERAGES if any(run.get(key) is not None for run in mine)]
        for key in keys:
            name = method if key == "test" else f"{method} ({AVERAGES[key]})"
            cells = [cell(groups[(method, lr)], key) if groups[(method, lr)] else "–" for lr in lrs]
            rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main() -> None:
    """One table per grid. Files named GRID.txt and GRID_SUFFIX.txt are one grid: a run of a
    later file replaces the run with the same method, lr, K and seed (a rerun with an averaged
    metric added), and must have reached the same final accuracy (the runs are seeded)."""
    grids: dict[str, dict[tuple, dict[str, Any]]] = defaultdict(dict)
    for path in sys.argv[1:]:
        grid = grids[path.rsplit("/", 1)[-1].split(".")[0].split("_")[0]]
        for run in load_runs(path):
            key = (run["method"], run["lr"], run["k"], run["seed"])
            if key in grid and grid[key].get("test") != run.get("test"):
                raise SystemExit(
                    f"{path}: rerun {key} ended at {run.get('test')}, "
                    f"the first run at {grid[key].get('test')}"
                )
            grid[key] = run
    for name, runs in grids.items():
        print(f"{name}: failures / runs (median final test accuracy % of the finished runs)\n")
        print(table(list(runs.values())) + "\n")


if __name__ == "__main__":
    main()
