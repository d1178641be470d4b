"""Benchmark plots: each metric against seconds and against oracle calls, one colour per
method, one line per seed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402

from bilevel.bench import metric_names, total_oracles  # noqa: E402

LOG_SCALE = ("error", "norm", "residual", "distance")


def plot_runs(runs: dict[str, list[list[dict[str, Any]]]], out: Path) -> list[Path]:
    """Write one PNG per metric (two panels: vs seconds, vs oracle calls); return the paths."""
    paths = []
    for metric in metric_names(runs):
        fig, (ax_time, ax_calls) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
        for index, (method, histories) in enumerate(runs.items()):
            color = f"C{index % 10}"
            for seed, rows in enumerate(histories):
                rows = [r for r in rows if isinstance(r.get(metric), (int, float))]
                if not rows:
                    continue
                label = method if seed == 0 else None
                values = [r[metric] for r in rows]
                ax_time.plot(
                    [r["seconds"] for r in rows], values, color=color, alpha=0.8, label=label
                )
                ax_calls.plot(
                    [total_oracles(r) for r in rows], values, color=color, alpha=0.8, label=label
                )
        for ax, xlabel in ((ax_time, "seconds (evaluation excluded)"), (ax_calls, "oracle calls")):
            ax.set_xlabel(xlabel)
            ax.set_ylabel(metric)
            ax.grid(alpha=0.3)
            if any(word in metric for word in LOG_SCALE):
                ax.set_yscale("log")
        ax_time.legend()
        fig.suptitle(f"{metric} (one line per seed)")
        path = Path(out) / f"{metric}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
