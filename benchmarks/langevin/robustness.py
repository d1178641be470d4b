"""Robustness grid in one process: final test accuracy of sgld, itd and cg on a task over
inner step sizes x inner step counts x seeds, at a fixed number of outer steps.

Usage: python benchmarks/langevin/robustness.py TASK STEPS "LR ..." "K ..." SEEDS [KEY=VALUE,...]
(the optional last argument holds task options, e.g. dataset=digits).
Prints one JSON line per run, then a markdown table of the spread (median, IQR, worst, best;
a run that raised, e.g. a diverging inner loop, counts as failed).
"""

from __future__ import annotations

import json
import statistics
import sys

import torch
import yaml

import bilevel as bl
from bilevel.tasks import make

METHODS = ("sgld", "itd", "cg")


def run(
    task_name: str, method: str, lr: float, k: int, seed: int, steps: int, task_options: dict
) -> float | None:
    task = make(task_name, seed=seed, **task_options)
    options = task.method_options(method, inner_lr=lr, inner_steps=k)
    try:
        result = bl.solve(
            task.problem, task.x0, task.y0, bl.method(method, **options), steps=steps,
            seed=seed, log_every=steps, callbacks=task.callbacks,
            **{k_: v for k_, v in task.solve_defaults.items() if k_ != "steps"},
        )  # fmt: skip
    except FloatingPointError:
        return None
    value = result.history[-1]["test_accuracy"]
    return value if value == value else None


def main() -> None:
    task_name, steps = sys.argv[1], int(sys.argv[2])
    lrs, ks, seeds = (
        map(float, sys.argv[3].split()),
        list(map(int, sys.argv[4].split())),
        int(sys.argv[5]),
    )
    task_options = {}
    if len(sys.argv) > 6:
        for pair in sys.argv[6].split(","):
            key, value = pair.split("=", 1)
            task_options[key] = yaml.safe_load(value)
    torch.set_num_threads(1)
    grid = [(lr, k, s) for lr in lrs for k in ks for s in range(seeds)]
    results: dict[str, list[float | None]] = {m: [] for m in METHODS}
    for method in METHODS:
        for lr, k, seed in grid:
            value = run(task_name, method, lr, k, seed, steps, task_options)
            results[method].append(value)
            print(json.dumps({"method": method, "lr": lr, "k": k, "seed": seed, "test": value}))
    print("\n| method | runs | failed | median | IQR | worst | best |")
    print("|---|---|---|---|---|---|---|")
    for method, values in results.items():
        ok = sorted(v for v in values if v is not None)
        q = statistics.quantiles(ok, n=4) if len(ok) > 1 else ok * 3
        print(
            f"| {method} | {len(values)} | {len(values) - len(ok)} | {statistics.median(ok):.4f} "
            f"| [{q[0]:.4f}, {q[2]:.4f}] | {ok[0]:.4f} | {ok[-1]:.4f} |"
        )


if __name__ == "__main__":
    main()
