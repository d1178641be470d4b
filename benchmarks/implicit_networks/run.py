"""Implicit and Krylov hypergradients on a network inner problem: hyper_cleaning with model=mlp.

For each dataset, method and seed: NaN or not, the validation loss at the first logged step and
at the end, the final test accuracy, and the task's naive reference (the MLP trained on every
corrupted sample). Methods run at their default options (the task's method defaults). Writes
one JSON line per run to --out. No timings are recorded.

    python benchmarks/implicit_networks/run.py --datasets digits fashion_mnist --steps 500
"""

from __future__ import annotations

import argparse
import json
import math

import bilevel as bl
from bilevel.tasks import make
from bilevel.tasks.hyper_cleaning import reference_points

METHODS = ("cg", "neumann", "subbio", "lancbio")


def run_one(dataset: str, method: str, seed: int, steps: int) -> dict:
    task = make("hyper_cleaning", dataset=dataset, model="mlp", seed=seed)
    solve_options = {k: v for k, v in task.solve_defaults.items() if k != "steps"}
    row = {"dataset": dataset, "method": method, "seed": seed, "steps": steps}
    try:
        result = bl.solve(
            task.problem,
            task.x0,
            task.y0,
            bl.method(method, **task.method_options(method)),
            steps=steps,
            log_every=max(steps // 10, 1),
            callbacks=task.callbacks,
            **solve_options,
        )
        first, last = result.history[0], result.history[-1]
        row.update(
            nan=not all(math.isfinite(r["val_loss"]) for r in result.history),
            val_loss_start=first["val_loss"],
            val_loss_end=last["val_loss"],
            test_accuracy=last["test_accuracy"],
        )
    except (bl.NonFiniteError, ValueError) as err:
        row.update(nan=True, error=str(err).splitlines()[0][:200])
    row["naive"] = reference_points(task, seed=seed)["naive"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["digits", "fashion_mnist"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--out", default="benchmarks/implicit_networks/results.jsonl")
    args = parser.parse_args()
    with open(args.out, "w") as out:
        for dataset in args.datasets:
            for method in args.methods:
                for seed in args.seeds:
                    row = run_one(dataset, method, seed, args.steps)
                    out.write(json.dumps(row) + "\n")
                    out.flush()
                    print(json.dumps(row))


if __name__ == "__main__":
    main()
