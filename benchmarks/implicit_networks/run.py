"""Implicit and Krylov hypergradients on a network inner problem: hyper_cleaning, model=mlp.

For each dataset, method and seed, at the methods' default options (the task's method
defaults): whether the run hit NaN/Inf (or a rejected linear solve), the validation loss at
the first logged step and at the end, the final test accuracy beside the task's naive
reference (the MLP trained on every corrupted sample), seconds per outer step (the timed
method steps of ``bl.solve``, callbacks excluded), oracle calls per step and the method's
event counts at the end (fallback steps, restarts, anchor resets: ``state.info``). Writes
``metrics.json`` (every run) and ``table.md`` (per dataset and method, over the seeds) to
``--out-dir`` after each run, so an interrupted run keeps what it finished.

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/implicit_networks/run.py      # 500 steps
    PYTHONPATH=. python benchmarks/implicit_networks/run.py --steps 3 --seeds 0 --out-dir /tmp/s
    ... run.py --datasets fashion_mnist --methods neumann --set solver_iters=15 --out-dir DIR
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
from pathlib import Path

import torch
import yaml

import bilevel as bl
from bilevel.tasks import make
from bilevel.tasks.hyper_cleaning import reference_points

METHODS = ("cg", "neumann", "subbio", "lancbio")
DATASETS = ("digits", "fashion_mnist")
HERE = Path(__file__).parent
# the cumulative counters the implicit (cg's guard, fallbacks) and Krylov methods keep in state.info
EVENTS = ("fallbacks", "negative_curvature", "restarts", "warm_start_dropped", "breakdowns",
          "indefinite", "anchor_resets")  # fmt: skip


def run_one(
    dataset: str, method: str, seed: int, steps: int, naive: float, overrides: dict
) -> dict:
    """One run's record (``error`` set when it stopped on NaN/Inf or a rejected solve);
    ``overrides`` replace method options (``--set``)."""
    task = make("hyper_cleaning", dataset=dataset, model="mlp", seed=seed)
    options = {**task.method_options(method), **overrides}
    solve_options = {k: v for k, v in task.solve_defaults.items() if k != "steps"}
    record = {"dataset": dataset, "method": method, "seed": seed, "steps": steps,
              "options": options, "naive_accuracy": naive, "error": None}  # fmt: skip
    rows: list[dict] = []
    try:
        result = bl.solve(
            task.problem,
            task.x0,
            task.y0,
            bl.method(method, **options),
            steps=steps,
            log_every=max(steps // 50, 1),
            callbacks=task.callbacks,
            on_log=rows.append,
            **solve_options,
        )
    except bl.NonFiniteError as err:
        record["error"] = str(err).splitlines()[0][:300]
    else:
        record["counters"] = counters(result.state.info)
    if rows:
        first, last = rows[0], rows[-1]
        record.update(
            steps_done=last["step"],
            val_loss=[(r["step"], r["val_loss"]) for r in rows],
            val_loss_first=first["val_loss"],
            val_loss_last=last["val_loss"],
            test_accuracy=last["test_accuracy"],
            seconds_per_step=last["seconds"] / last["step"],
            cpu_seconds_per_step=last["cpu_seconds"] / last["step"],
            oracles_per_step={k: n / last["step"] for k, n in last["oracles"].items()},
            residual_last=last.get("residual"),
            hypergradient_norm_last=last.get("hypergradient_norm"),
        )
    record["nan"] = record["error"] is not None or not all(
        math.isfinite(r["val_loss"]) for r in rows
    )
    return record


def counters(info: dict) -> dict[str, int]:
    """The method's cumulative event counts at the end of a run (:data:`EVENTS` found in
    ``state.info``): what the history rows do not carry."""
    return {k: int(info[k]) for k in EVENTS if k in info}


def _mean(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.3g}"
    return f"{statistics.mean(values):.3g} ± {statistics.stdev(values):.2g}"


def table(runs: list[dict]) -> str:
    """One row per (dataset, method): the seeds' runs summarised."""
    header = ["dataset", "method", "seeds", "NaN / error", "val loss first → last",
              "falls (seeds)", "test acc. %", "naive ref. %", "s / step", "CPU s / step",
              "oracles / step", "events (all seeds)"]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    groups: dict[tuple[str, str], list[dict]] = {}
    for run in runs:
        groups.setdefault((run["dataset"], run["method"]), []).append(run)
    for (dataset, method), group in groups.items():
        done = [r for r in group if "val_loss_last" in r]
        falls = sum(r["val_loss_last"] < r["val_loss_first"] for r in done)
        first = _mean([r["val_loss_first"] for r in done])
        last = _mean([r["val_loss_last"] for r in done])
        counts = done[0]["oracles_per_step"] if done else {}
        oracles = ", ".join(f"{k} {v:.3g}" for k, v in sorted(counts.items()))
        events: dict[str, int] = {}
        for run in done:
            for name, n in run.get("counters", {}).items():
                events[name] = events.get(name, 0) + n
        lines.append("| " + " | ".join([
            dataset, method, str(len(group)), f"{sum(r['nan'] for r in group)}/{len(group)}",
            f"{first} → {last}", f"{falls}/{len(group)}",
            _mean([r["test_accuracy"] for r in done]),
            _mean([r["naive_accuracy"] for r in group]),
            _mean([r["seconds_per_step"] for r in done]),
            _mean([r["cpu_seconds_per_step"] for r in done]), oracles or "–",
            ", ".join(f"{k} {n}" for k, n in sorted(events.items())) or "–",
        ]) + " |")  # fmt: skip
    errors = [f"- {r['dataset']} {r['method']} seed {r['seed']}: {r['error']}"
              for r in runs if r["error"]]  # fmt: skip
    return "\n".join(lines + ([""] + errors if errors else [])) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--out-dir", type=Path, default=HERE)
    parser.add_argument("--set", action="append", default=[], metavar="OPTION=VALUE",
                        help="override a method option for every method (a YAML value), "
                        "e.g. --set solver_iters=15; write to another --out-dir")  # fmt: skip
    args = parser.parse_args()
    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set takes OPTION=VALUE, got {item!r}")
        overrides[key] = yaml.safe_load(value)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    # as the bilevel command does: subnormal floats (corrupted samples' weights underflow after
    # ~200 outer steps) made a step 5x slower on digits
    flushed = torch.set_flush_denormal(True)
    environment = {"torch": torch.__version__, "threads": torch.get_num_threads(),
                   "flush_denormal": flushed,
                   "machine": platform.processor() or platform.machine()}  # fmt: skip
    runs: list[dict] = []
    for dataset in args.datasets:
        for seed in args.seeds:
            naive = reference_points(make("hyper_cleaning", dataset=dataset, model="mlp",
                                          seed=seed), seed=seed)["naive"]  # fmt: skip
            for method in args.methods:
                runs.append(run_one(dataset, method, seed, args.steps, naive, overrides))
                last = runs[-1]
                print(json.dumps({k: last.get(k) for k in ("dataset", "method", "seed", "nan",
                      "val_loss_first", "val_loss_last", "test_accuracy",
                      "seconds_per_step")}), flush=True)  # fmt: skip
                metrics = {"environment": environment, "steps": args.steps,
                           "overrides": overrides, "runs": runs}  # fmt: skip
                (args.out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
                (args.out_dir / "table.md").write_text(table(runs))


if __name__ == "__main__":
    main()
