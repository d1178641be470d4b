"""Krylov benchmark figures: metrics against seconds and against the method's own HVP count.

    python benchmarks/krylov/plot.py FOLDER METRIC [METRIC ...]

Reads FOLDER/<method>-s<seed>/metrics.jsonl (``bilevel bench`` output). The HVP axis subtracts
the residual diagnostic's own calls (``diagnostic_oracles``), so it counts the method's work
only. With several seeds, each method's line is the median over seeds on a common time / HVP
grid (a seed's value holds between its logged rows). Writes FOLDER/krylov_<METRIC>.png.
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from bilevel.bench import collect  # noqa: E402

LOG = ("residual", "norm", "error")


def own_hvps(row: dict) -> int:
    return row["oracles"].get("hvp", 0) - row.get("diagnostic_oracles", {}).get("hvp", 0)


def median_curve(histories: list[list[dict]], metric: str, axis) -> tuple[np.ndarray, np.ndarray]:
    """Median over seeds of ``metric`` on a grid of ``axis(row)`` (step function per seed)."""
    curves = []
    for rows in histories:
        rows = [r for r in rows if isinstance(r.get(metric), (int, float))]
        curves.append((np.array([axis(r) for r in rows]), np.array([r[metric] for r in rows])))
    end = min(c[0][-1] for c in curves)
    start = max(c[0][0] for c in curves)
    grid = np.linspace(start, end, 200)
    values = [v[np.clip(np.searchsorted(t, grid, side="right") - 1, 0, None)] for t, v in curves]
    return grid, np.median(np.array(values), axis=0)


def main(folder: str, metrics: list[str]) -> None:
    runs = collect(Path(folder))
    for metric in metrics:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
        for index, (method, histories) in enumerate(sorted(runs.items())):
            if not any(metric in r for rows in histories for r in rows):
                continue
            for ax, axis in zip(axes, (lambda r: r["seconds"], own_hvps), strict=True):
                grid, median = median_curve(histories, metric, axis)
                ax.plot(grid, median, color=f"C{index}", label=method)
        for ax, label in zip(axes, ("seconds (evaluation excluded)", "HVPs (method's own)"),
                             strict=True):  # fmt: skip
            ax.set_xlabel(label)
            ax.set_ylabel(metric)
            ax.grid(alpha=0.3)
            if any(word in metric for word in LOG):
                ax.set_yscale("log")
        axes[0].legend()
        seeds = max(len(h) for h in runs.values())
        fig.suptitle(f"{metric}: median over {seeds} seed(s)")
        fig.savefig(Path(folder) / f"krylov_{metric}.png", dpi=110)
        plt.close(fig)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
