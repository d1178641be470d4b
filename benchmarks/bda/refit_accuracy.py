"""Leakage-free test accuracy of finished hyper-cleaning bench runs: the model refitted to x alone.

BDA's y_K is trained on the validation labels inside every outer step (its aggregated inner
step descends the upper loss), so the logged ``test_accuracy`` of y_K does not compare methods.
This reads each run's final x from its ``checkpoint.pt``, rebuilds the run's task from its
``config.yaml`` (same seed and options) with ``refit_accuracy=True`` and evaluates the task's
metrics there: ``refit_test_accuracy`` fits the inner model from y₀ to the training loss
weighted by sigmoid(x), without validation labels (the task's L-BFGS fit), beside the x-only
F1 and the logged accuracy of y_K (recomputed from the checkpoint's y). The task's reference
points (the model fitted on the clean samples only, "oracle", and on all with weight 1,
"naive") are rows of their own. Writes ``refit_accuracy.md`` and ``refit_accuracy.json``:

    python benchmarks/bda/refit_accuracy.py benchmarks/bda/paper/cleaning_linear

A run that did not finish is refused.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from types import SimpleNamespace

import torch

from bilevel.bench import CHECKPOINT, load_finished_run
from bilevel.solve import StepContext
from bilevel.tasks.hyper_cleaning import reference_points

COLUMNS = ("refit_test_accuracy", "f1", "test_accuracy")


def measure(run: Path) -> tuple[int, int, dict[str, float], dict[str, float]]:
    """(seed, step, the run's metrics at its final x, the seed's reference points)."""
    config, task, checkpoint = load_finished_run(run, "hyper_cleaning", refit_accuracy=True)
    state = SimpleNamespace(y=checkpoint["state"]["y"])  # the callbacks read state.y only
    ctx = StepContext(config.steps, checkpoint["x"], state, hg={}, hg_x={})
    metrics = {k: v for callback in task.callbacks for k, v in (callback(ctx) or {}).items()}
    return config.seed, checkpoint["step"], metrics, reference_points(task)


def table(results: dict[str, list[dict]]) -> str:
    lines = [
        "At each run's last step; median [min, max] over seeds. refit_test_accuracy: the inner "
        "model fitted to the training loss weighted by sigmoid(x) alone (no validation labels); "
        "f1: clean-sample detection by x; test_accuracy: of the run's own y_K.",
        "",
        "| run | steps | seeds | " + " | ".join(COLUMNS) + " |",
        "|---|---|---|" + "---|" * len(COLUMNS),
    ]
    for label, rows in results.items():
        cells = [label, str(rows[0]["step"]), str(len(rows))]
        for column in COLUMNS:
            values = [r[column] for r in rows if column in r]
            cells.append(
                f"{statistics.median(values):.4g} [{min(values):.4g}, {max(values):.4g}]"
                if values
                else "–"
            )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("setting", type=Path, help="a run_paper.sh setting folder")
    args = parser.parse_args()
    torch.set_num_threads(1)
    runs = sorted(p.parent for p in args.setting.glob(f"*/*/{CHECKPOINT}"))
    if not runs:
        raise SystemExit(f"{args.setting}: no LABEL/RUN folder with a {CHECKPOINT}")
    results: dict[str, list[dict]] = {}
    references: dict[int, dict[str, float]] = {}
    for run in runs:
        seed, step, metrics, refs = measure(run)
        references.setdefault(seed, refs)
        row = {"seed": seed, "step": step, **{k: metrics[k] for k in COLUMNS}}
        print(json.dumps({"run": str(run), **row}), flush=True)
        results.setdefault(run.parent.name, []).append(row)
    for name in ("oracle", "naive"):
        results[f"reference: {name}"] = [
            {"seed": seed, "step": 0, "refit_test_accuracy": refs[name]}
            for seed, refs in sorted(references.items())
        ]
    (args.setting / "refit_accuracy.json").write_text(json.dumps(results, indent=1))
    text = table(results)
    (args.setting / "refit_accuracy.md").write_text(text)
    print(text, end="")


if __name__ == "__main__":
    main()
