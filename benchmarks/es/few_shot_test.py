"""Meta-test accuracy of finished few-shot bench runs (the standard 600-episode protocol).

`bilevel bench few_shot` logs accuracy on the fixed meta-*validation* episodes only. This reads
each run's final outer variable x from its ``checkpoint.pt``, rebuilds the run's task from its
``config.yaml`` (same seed and options) and adapts zero heads on seeded meta-*test* episodes
with the task's GD adaptation (:func:`bilevel.tasks.few_shot.evaluate`); the episodes are the
same for every run. Beside it, the largest curvature L of the head problem on the features of
x (max over the first 20 test episodes' support sets: the cross-entropy's curvature at zero
heads, :func:`~bilevel.tasks.few_shot.head_curvature`, plus ``head_l2``):
the inner GD step must stay below 2/L for the inner loop to approach y*. Writes
``test_accuracy.md`` and ``test_accuracy.json`` to ``--out``:

    python benchmarks/es/few_shot_test.py benchmarks/es/paper/few_shot/esj_authors \\
        benchmarks/es/paper/few_shot/others --out benchmarks/es/paper/few_shot

A run is labelled ``<bench folder>/<method>``; a run that did not finish is refused. The
untrained x of each seed (``task.x0``) is measured too, as the "initial x (step 0)" row.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from bilevel.bench import CHECKPOINT, load_finished_run
from bilevel.tasks.base import Task
from bilevel.tasks.few_shot import EVAL_CHUNK, evaluate, head_curvature


def measure(task: Task, x: dict, episodes: int) -> dict:
    """Test accuracy of ``x`` (mean and 95% half-width, percent) and its head curvature."""
    mean, half = evaluate(task, x, episodes=episodes)
    setup = task.metadata["setup"]
    first = next(setup.episodes("test", EVAL_CHUNK, 0))  # the block-diagonal Hessian's top
    with torch.no_grad():  # eigenvalue is the largest of the episodes'
        feats = setup.features(x, first.support_x)
    curvature = head_curvature(feats, first.support_y, setup.n_way) + setup.head_l2
    return {"mean": mean, "ci95": half, "head_curvature": curvature}


def table(results: dict[str, list[dict]], episodes: int) -> str:
    lines = [
        f"Meta-test accuracy % after the run's last step, {episodes} test episodes (the same for "
        "every run); median over seeds, then each seed's mean ± 95% half-width; the head "
        "problem's largest curvature L on the final features (median over seeds).",
        "",
        "| run | steps | seeds | median | per seed | head curvature L |",
        "|---|---|---|---|---|---|",
    ]
    for label, rows in results.items():
        per_seed = ", ".join(f"{r['mean']:.2f} ± {r['ci95']:.2f}" for r in rows)
        median = statistics.median(r["mean"] for r in rows)
        curvature = statistics.median(r["head_curvature"] for r in rows)
        lines.append(
            f"| {label} | {rows[0]['steps']} | {len(rows)} | {median:.2f} | {per_seed} "
            f"| {curvature:.3g} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("benches", nargs="+", type=Path, help="bench output folders")
    parser.add_argument("--episodes", type=int, default=600)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    results: dict[str, list[dict]] = {}
    initial: dict[int, dict] = {}
    for bench in args.benches:
        runs = sorted(p.parent for p in bench.glob(f"*/{CHECKPOINT}"))
        if not runs:
            raise SystemExit(f"{bench}: no run folder with a {CHECKPOINT}")
        for run in runs:
            config, task, checkpoint = load_finished_run(run, "few_shot")
            if config.seed not in initial:  # the untrained x of this seed, once
                initial[config.seed] = {"seed": config.seed, "steps": 0,
                                        **measure(task, task.x0, args.episodes)}  # fmt: skip
            row = {"seed": config.seed, "steps": checkpoint["step"],
                   **measure(task, checkpoint["x"], args.episodes)}  # fmt: skip
            print(json.dumps({"run": str(run), **row}), flush=True)
            results.setdefault(f"{bench.name}/{run.name.rsplit('-s', 1)[0]}", []).append(row)
    results["initial x (step 0)"] = [initial[seed] for seed in sorted(initial)]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "test_accuracy.json").write_text(json.dumps(results, indent=1))
    text = table(results, args.episodes)
    (args.out / "test_accuracy.md").write_text(text)
    print(text, end="")


if __name__ == "__main__":
    main()
