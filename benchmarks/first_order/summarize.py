"""Merge the per-method bench folders of one setting into one table and one set of plots.

    python benchmarks/first_order/summarize.py benchmarks/first_order/cleaning_full

SETTING/LABEL/METHOD-sSEED/metrics.jsonl (written by run_all.sh) -> SETTING/table.md and
SETTING/METRIC.png: each metric against outer steps, gradient-oracle calls, all oracle calls
and CPU seconds (evaluation excluded), one colour per label, one line per seed. Oracle calls
are split into first-order gradients (∇_y g, ∇_x g, (∇_x f, ∇_y f), and a linearisation: one
∇_y g pass that keeps its graph), second-order products (HVPs, mixed products, JVPs) and
evaluations, each counted as one call. The tables give wall and CPU seconds.
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from bilevel.bench import METRICS, collect, metric_names, stop_reason  # noqa: E402

# linearize is one pass of ∇_y g that keeps its graph for the products (AID, Krylov)
GRADIENTS = ("lower_grad", "upper_grad", "lower_grad_x", "linearize")
SECOND_ORDER = ("hvp", "mixed", "jvp", "upper_hvp", "upper_mixed")
EVALUATIONS = ("lower_eval", "upper_eval")
LOG_SCALE = ("loss", "error", "distance")


def calls(row: dict, kinds: tuple[str, ...]) -> int:
    return int(sum(row["oracles"].get(k, 0) for k in kinds))


def load(setting: Path) -> tuple[dict[str, list[list[dict]]], dict[str, list[str]]]:
    """{label: [rows of each seed]} over the label folders of a setting, and {label: [what
    stopped each seed's run]} (``bilevel.bench.stop_reason``: budget, steps, non-finite)."""
    runs, stops = {}, {}
    for folder in sorted(p for p in setting.iterdir() if p.is_dir()):
        for histories in collect(folder).values():
            runs[folder.name] = histories
        seeds = sorted(p for p in folder.iterdir() if (p / METRICS).exists())
        stops[folder.name] = [stop_reason(p) for p in seeds]
    if not runs:
        raise SystemExit(f"no runs under {setting}")
    return runs, stops


def median_iqr(values: list[float]) -> str:
    if not values:
        return "–"
    q = torch.quantile(torch.tensor(values, dtype=torch.float64),
                       torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))  # fmt: skip
    return f"{q[1]:.4g} [{q[0]:.4g}, {q[2]:.4g}]"


def table(
    runs: dict[str, list[list[dict]]], stops: dict[str, list[str]], at_step: int | None
) -> str:
    """Median [IQR] over seeds at the last logged row (or the last row at or before
    ``at_step``), with what stopped each label's runs."""
    metrics = metric_names(runs)
    columns = ["steps", "seconds", "cpu_seconds", *metrics,
               "gradient calls", "2nd-order calls", "evaluations"]  # fmt: skip
    lines = ["| method | seeds | stopped by | " + " | ".join(columns) + " |",
             "|---|---|---|" + "---|" * len(columns)]  # fmt: skip
    for label, histories in runs.items():
        finals = []
        for rows in histories:
            kept = [r for r in rows if at_step is None or r["step"] <= at_step]
            if kept:
                finals.append(kept[-1])
        cells = []
        for column in columns:
            values = []
            for row in finals:
                if column == "steps":
                    values.append(float(row["step"]))
                elif column == "gradient calls":
                    values.append(float(calls(row, GRADIENTS)))
                elif column == "2nd-order calls":
                    values.append(float(calls(row, SECOND_ORDER)))
                elif column == "evaluations":
                    values.append(float(calls(row, EVALUATIONS)))
                elif isinstance(row.get(column), (int, float)):
                    values.append(float(row[column]))
            cells.append(median_iqr(values))
        reasons = stops.get(label, [])
        tally = ", ".join(f"{r} {reasons.count(r)}" for r in dict.fromkeys(reasons)) or "–"
        lines.append(f"| {label} | {len(histories)} | {tally} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(runs: dict[str, list[list[dict]]], setting: Path) -> list[Path]:
    axes_of = (("outer steps", lambda r: r["step"]),
               ("gradient-oracle calls (first order)", lambda r: calls(r, GRADIENTS)),
               ("all oracle calls (an HVP counts one)", lambda r: sum(r["oracles"].values())),
               ("CPU seconds (evaluation excluded)", lambda r: r["cpu_seconds"]))  # fmt: skip
    paths = []
    for metric in metric_names(runs):
        fig, axes = plt.subplots(1, 4, figsize=(20, 4), constrained_layout=True)
        for index, (label, histories) in enumerate(runs.items()):
            for seed, rows in enumerate(histories):
                rows = [r for r in rows if isinstance(r.get(metric), (int, float))]
                for ax, (_, x_of) in zip(axes, axes_of, strict=True):
                    ax.plot([x_of(r) for r in rows], [r[metric] for r in rows], ".-", alpha=0.8,
                            color=f"C{index % 10}", label=label if seed == 0 else None)  # fmt: skip
        for ax, (name, _) in zip(axes, axes_of, strict=True):
            ax.set_xlabel(name)
            ax.set_ylabel(metric)
            ax.grid(alpha=0.3)
            if any(word in metric for word in LOG_SCALE):
                ax.set_yscale("log")
        axes[0].legend(fontsize=8)
        fig.suptitle(f"{setting.name}: {metric} (one line per seed)")
        path = setting / f"{metric}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def main(setting: Path) -> None:
    runs, stops = load(setting)
    common = min(rows[-1]["step"] for histories in runs.values() for rows in histories)
    text = (
        f"# {setting.name}\n\nAt the end of each run (the budget, or where it stopped on "
        f"NaN/Inf: \"non-finite\"); median [interquartile range] over seeds.\n\n"
        f"{table(runs, stops, None)}\nAt outer step {common} (the fewest steps any run "
        f"reached; last logged row at or before it).\n\n{table(runs, stops, common)}"
    )
    (setting / "table.md").write_text(text)
    print(text)
    for path in plot(runs, setting):
        print(f"plot: {path}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: summarize.py SETTING_FOLDER")
    main(Path(sys.argv[1]))
