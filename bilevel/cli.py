"""The ``bilevel`` command line: ``bilevel list`` and ``bilevel quick``."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

import torch

import bilevel as bl
from bilevel.methods.base import method_class
from bilevel.tasks import quadratic

QUICK_OPTIONS = {
    "itd": {"inner_steps": 300, "inner_lr": 1.0},
    "forward": {"inner_steps": 300, "inner_lr": 1.0},
    "cg": {"inner_steps": 300, "inner_lr": 1.0, "solver_iters": 50, "solver_tol": 1e-12},
    "neumann": {"inner_steps": 300, "inner_lr": 1.0, "solver_iters": 300, "solver_lr": 1.0},
    "fixed_point": {"inner_steps": 300, "inner_lr": 1.0, "solver_iters": 300, "solver_lr": 1.0},
}


def cmd_list(args: argparse.Namespace) -> int:
    print("methods:")
    for name in bl.methods_available():
        print(f"  {name:12s} {method_class(name).description()}")
    return 0


def cmd_quick(args: argparse.Namespace) -> int:
    """Hypergradient of a random quadratic by every baseline, against the closed form."""
    task = quadratic(dim_x=args.dim_x, dim_y=args.dim_y, condition=args.condition, seed=args.seed)
    exact = task.metadata["data"].hypergradient(task.x0)["x"]
    print(
        f"random quadratic: dim_x={args.dim_x} dim_y={args.dim_y} condition={args.condition:g} "
        f"seed={args.seed} (float64, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads)"
    )
    print(f"| {'method':11s} | rel. error | seconds | oracle counts |")
    print(f"|{'-' * 13}|{'-' * 12}|{'-' * 9}|{'-' * 15}|")
    for name, options in QUICK_OPTIONS.items():
        task.problem.counts.clear()
        start = time.perf_counter()
        hg = bl.hypergrad(task.problem, task.x0, task.y0, bl.method(name, **options))["x"]
        seconds = time.perf_counter() - start
        error = float(torch.linalg.norm(hg - exact) / torch.linalg.norm(exact))
        counts = ", ".join(f"{k}={v}" for k, v in sorted(task.problem.counts.items()))
        print(f"| {name:11s} | {error:10.2e} | {seconds:7.2f} | {counts} |")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bilevel", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the registered methods").set_defaults(run=cmd_list)
    quick = sub.add_parser("quick", help="every method vs the exact hypergradient")
    quick.add_argument("--dim-x", type=int, default=5)
    quick.add_argument("--dim-y", type=int, default=20)
    quick.add_argument("--condition", type=float, default=10.0)
    quick.add_argument("--seed", type=int, default=0)
    quick.set_defaults(run=cmd_quick)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"bilevel: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
