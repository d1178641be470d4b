"""Robustness grid in one process: final test accuracy of sgld and the deterministic baselines
on a task over inner step sizes x inner step counts x seeds, at a fixed number of outer steps,
with failure rates beside the medians.

Usage: python benchmarks/langevin/robustness.py TASK STEPS "LR ..." "K ..." SEEDS [KEY=VALUE,...]
       [--methods sgld,itd,cg,neumann] [-o KEY=VALUE | -o METHOD.KEY=VALUE ...]
       [--tie-solver-lr] [--threshold T|naive] [--temperature-rule data_size] [--keep-samples S]
       [--average-last S]

The optional positional KEY=VALUE,... holds task options (e.g. dataset=digits,model=mlp,
hidden=100,n_train=600,weight_decay=0 for an over-parameterised MLP inner model, batch_size=32
for noisy mini-batches). ``-o KEY=VALUE`` sets a method option on every method that has it (e.g.
``-o inner_optimizer=gd``: sgld has none), ``-o METHOD.KEY=VALUE`` on that method only (e.g.
``-o sgld.burn_in=20``). ``--tie-solver-lr`` sets each linear solver's step (Neumann's
``solver_lr``) to the grid's inner step, so inner steps above 2/L are also Neumann steps above
2/L. ``--temperature-rule data_size`` gives sgld ``data_size`` = the task's ``n_train`` (τ = 1/N,
docs/methods/langevin.md). ``--keep-samples S`` keeps sgld's last S chain states and also
reports the test accuracy of the probabilities averaged over them (hyper_cleaning only).
``--average-last S`` is the deterministic methods' counterpart (a control for the averaging,
not part of any method): the test accuracy of the probabilities averaged over the inner
iterates ``state.y`` of their last S outer steps (logged every step to see them; the history
rows are still every ``--log-every`` steps).

A run fails when it diverges (a NaN/Inf stops ``bl.solve``) or when its final test accuracy is
below ``--threshold``: a number, or ``naive`` — the test accuracy of the inner model trained on
every (corrupted) training sample with weight 1, computed per seed by the task's reference
points (hyper_cleaning), i.e. a run fails when it cleans worse than not cleaning at all.
Default: no threshold, divergence only. Prints one JSON line per run
(accuracy, chain-averaged accuracy, CPU seconds of the whole run including evaluation, total
oracle calls), then a markdown table per method: runs, failures and the failure rate, then the
median, IQR, worst and best accuracy of the runs that did not diverge, and the median CPU seconds
and oracle calls.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections import deque
from typing import Any

import torch
import torch.nn.functional as F

import bilevel as bl
from bilevel import option_values
from bilevel.methods.base import method_class
from bilevel.methods.langevin import chain_average
from bilevel.solve import StepContext
from bilevel.tasks import make
from bilevel.tasks.base import Task
from bilevel.tasks.hyper_cleaning import inner_model

METHODS = "sgld,itd,cg"


def parse_pairs(pairs: list[str]) -> dict[str, Any]:
    """KEY=VALUE pairs with values read as the CLI reads untyped options (``1e-5`` a number,
    ``true`` a bool, ``gd`` a string), not by YAML 1.1, which keeps ``1e-5`` a string."""
    out = {}
    for pair in pairs:
        key, value = pair.split("=", 1)
        out[key] = option_values.parse(value, Any, key)
    return out


def options_for(method: str, options: dict[str, Any]) -> dict[str, Any]:
    """Plain keys where the method has the option, ``METHOD.KEY`` keys for that method only."""
    known = set(method_class(method).option_names())
    chosen = {k: v for k, v in options.items() if "." not in k and k in known}
    prefix = method + "."
    chosen.update({k[len(prefix) :]: v for k, v in options.items() if k.startswith(prefix)})
    return chosen


def chain_metric(task: Task) -> Any:
    """A callback: test accuracy of the softmax averaged over sgld's kept chain samples."""
    split = task.metadata["data"]
    apply, _ = inner_model(split)

    def metric(ctx: StepContext) -> dict[str, float]:
        samples = getattr(ctx.state, "samples", None)
        if samples is None:
            return {}
        with torch.no_grad():
            probs = chain_average(lambda y: F.softmax(apply(y, split.test), dim=1), samples)
            hits = (probs.argmax(dim=1) == split.test_labels).float().mean()
        return {"chain_test_accuracy": 100.0 * float(hits)}

    return metric


def iterate_metric(task: Task, keep: int) -> Any:
    """A callback (logged every step): test accuracy of the softmax averaged over the inner
    iterates of the last ``keep`` outer steps, stacked like sgld's kept samples."""
    split = task.metadata["data"]
    apply, _ = inner_model(split)
    recent: deque[dict[str, torch.Tensor]] = deque(maxlen=keep)

    def metric(ctx: StepContext) -> dict[str, float]:
        recent.append({k: v.detach().clone() for k, v in ctx.state.y.items()})
        iterates = {k: torch.stack([y[k] for y in recent]) for k in recent[0]}
        with torch.no_grad():
            probs = chain_average(lambda y: F.softmax(apply(y, split.test), dim=1), iterates)
            hits = (probs.argmax(dim=1) == split.test_labels).float().mean()
        return {"average_test_accuracy": 100.0 * float(hits)}

    return metric


_NAIVE: dict[tuple, float] = {}


def naive_accuracy(task: Task) -> float:
    """The task's "naive" reference (cached per task settings and seed)."""
    if task.references is None:
        raise SystemExit(f"--threshold naive: task {task.name} has no reference points")
    key = tuple(sorted((k, str(v)) for k, v in task.metadata.items() if k != "data"))
    if key not in _NAIVE:
        _NAIVE[key] = task.references()["naive"]["test_accuracy"]
    return _NAIVE[key]


def run(task_name: str, method: str, lr: float, k: int, seed: int, args) -> dict[str, Any]:
    task = make(task_name, seed=seed, **args.task_options)
    options = options_for(method, args.method_options)
    known = set(method_class(method).option_names())
    if args.tie_solver_lr and "solver_lr" in known:
        options["solver_lr"] = lr
    if method == "sgld":
        if args.temperature_rule == "data_size":
            options.setdefault("data_size", int(task.metadata["n_train"]))
        if args.keep_samples:
            options.setdefault("keep_samples", args.keep_samples)
    options = task.method_options(method, inner_lr=lr, inner_steps=k, **options)
    callbacks = list(task.callbacks)
    log_every = args.log_every
    if method == "sgld" and args.keep_samples and task.name == "hyper_cleaning":
        callbacks.append(chain_metric(task))
    if method != "sgld" and args.average_last and task.name == "hyper_cleaning":
        callbacks.append(iterate_metric(task, args.average_last))
        log_every = 1
    out: dict[str, Any] = {"method": method, "lr": lr, "k": k, "seed": seed}
    if args.threshold == "naive":
        out["threshold"] = naive_accuracy(task)
    elif args.threshold is not None:
        out["threshold"] = float(args.threshold)
    start = time.process_time()
    try:
        result = bl.solve(
            task.problem, task.x0, task.y0, bl.method(method, **options), steps=args.steps,
            seed=seed, log_every=log_every, callbacks=callbacks,
            **{k_: v for k_, v in task.solve_defaults.items() if k_ != "steps"},
        )  # fmt: skip
    except FloatingPointError as err:  # a NaN/Inf anywhere: bl.solve stops the run
        return {**out, "test": None, "diverged": str(err).splitlines()[0][:120]}
    last = result.history[-1]
    value = last["test_accuracy"]
    keys = ("step", "test_accuracy", "chain_test_accuracy", "average_test_accuracy")
    return {
        **out,
        "test": value if value == value else None,
        "chain_test": last.get("chain_test_accuracy"),
        "average_test": last.get("average_test_accuracy"),
        "cpu_seconds": time.process_time() - start,
        "oracle_calls": int(sum(last["oracles"].values())),
        "history": [
            {key: row.get(key) for key in keys}
            for row in result.history
            if row["step"] % args.log_every == 0 or row is last
        ],
    }


def summary(results: dict[str, list[dict[str, Any]]], threshold: str | None) -> str:
    stated = {
        None: "none (divergence only)",
        "naive": "test accuracy below the naive reference of its seed (all samples, weight 1)",
    }.get(threshold, f"test accuracy < {threshold}")
    lines = [
        f"\nFailure: divergence (NaN/Inf) or {stated}.\n",
        "| method | runs | diverged | below threshold | failure rate | median | IQR | worst | best "
        "| averaged median (chain / last iterates) | CPU s (median) | oracle calls (median) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method, rows in results.items():
        ok = sorted(r["test"] for r in rows if r["test"] is not None)
        diverged = len(rows) - len(ok)
        below = sum(
            1 for r in rows if r["test"] is not None and r["test"] < r.get("threshold", -math.inf)
        )
        rate = (diverged + below) / len(rows)
        if ok:
            q = statistics.quantiles(ok, n=4) if len(ok) > 1 else ok * 3
            spread = (
                f"{statistics.median(ok):.4f} | [{q[0]:.4f}, {q[2]:.4f}] "
                f"| {ok[0]:.4f} | {ok[-1]:.4f}"
            )
        else:
            spread = "– | – | – | –"
        chain = [
            r.get("chain_test") or r.get("average_test")
            for r in rows
            if (r.get("chain_test") or r.get("average_test")) is not None
        ]
        seconds = [r["cpu_seconds"] for r in rows if "cpu_seconds" in r]
        calls = [r["oracle_calls"] for r in rows if "oracle_calls" in r]
        lines.append(
            f"| {method} | {len(rows)} | {diverged} | {below} | {rate:.0%} | {spread} "
            f"| {_median(chain, '.4f')} | {_median(seconds, '.1f')} | {_median(calls, '.0f')} |"
        )
    return "\n".join(lines)


def _median(values: list[float], fmt: str) -> str:
    return format(statistics.median(values), fmt) if values else "–"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("task")
    parser.add_argument("steps", type=int)
    parser.add_argument("lrs", help='inner step sizes, e.g. "0.5 1.6 2.5"')
    parser.add_argument("ks", help='inner step counts, e.g. "1 2 10"')
    parser.add_argument("seeds", type=int)
    parser.add_argument("task_pairs", nargs="?", default="", help="KEY=VALUE,... task options")
    parser.add_argument("--methods", default=METHODS)
    parser.add_argument("-o", dest="method_pairs", action="append", default=[])
    parser.add_argument("--tie-solver-lr", action="store_true")
    parser.add_argument("--threshold", default=None, help="a number or 'naive'")
    parser.add_argument("--temperature-rule", choices=("data_size",), default=None)
    parser.add_argument("--keep-samples", type=int, default=0)
    parser.add_argument("--average-last", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=None, help="default: STEPS // 10")
    args = parser.parse_args(argv)
    args.task_options = parse_pairs([p for p in args.task_pairs.split(",") if p])
    args.method_options = parse_pairs(args.method_pairs)
    args.lrs = [float(v) for v in args.lrs.split()]
    args.ks = [int(v) for v in args.ks.split()]
    args.methods = args.methods.split(",")
    args.log_every = args.log_every or max(args.steps // 10, 1)
    return args


def main() -> None:
    args = parse()
    torch.set_num_threads(1)
    grid = [(lr, k, s) for lr in args.lrs for k in args.ks for s in range(args.seeds)]
    results: dict[str, list[dict[str, Any]]] = {m: [] for m in args.methods}
    for method in args.methods:
        for lr, k, seed in grid:
            row = run(args.task, method, lr, k, seed, args)
            results[method].append(row)
            print(json.dumps(row), flush=True)
    print(summary(results, args.threshold))


if __name__ == "__main__":
    main()
