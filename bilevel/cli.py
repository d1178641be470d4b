"""The ``bilevel`` command line.

    bilevel list                                    tasks and methods
    bilevel check                                   every method vs an exact hypergradient
    bilevel run TASK --method M [options]           one run into a results folder
    bilevel run TASK --import my_tasks ...          with a task registered by your module
    bilevel bench TASK --methods a,b --budget S --seeds N [--out DIR]
    bilevel bench quick                             the embedded-default comparison

Options can also come from a YAML file (``--config``); command-line flags win.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

import bilevel as bl
from bilevel import distributed
from bilevel.checks import check_int
from bilevel.data.errors import DataError
from bilevel.methods.base import method_class

# `bilevel bench quick`: embedded data (scikit-learn digits), about two minutes on 2 cores
PRESETS: dict[str, dict[str, Any]] = {
    "quick": {
        "task": "hyper_cleaning",
        "task_options": {"dataset": "digits", "corruption": 0.5},
        "methods": ["itd", "cg", "neumann", "fixed_point"],
        "budget": 10.0,
        "seeds": 2,
        "log_every": 5,
    },
}

RUN_KEYS = ("steps", "budget", "outer_optimizer", "outer_lr", "log_every", "checkpoint_every",
            "threads", "shard", "box")  # fmt: skip


class UsageError(ValueError):
    """A bad command line or config file."""


def cmd_list(args: argparse.Namespace) -> int:
    print("tasks:")
    for name in bl.tasks.tasks_available():
        doc = (bl.tasks.task_factory(name).__doc__ or "").strip().splitlines()
        print(f"  {name:22s} {doc[0] if doc else ''}")
    print("methods:")
    for name in bl.methods_available():
        print(f"  {name:22s} {method_class(name).description()}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """Every registered method against the closed-form hypergradient of a random quadratic,
    with its tolerance and a pass/fail verdict (see :func:`bilevel.check.check_quadratic`)."""
    from bilevel.check import check_quadratic

    report = check_quadratic(args.dim_x, args.dim_y, args.condition, args.seed)
    print(report)
    return 0 if report.passed else 1


def import_user_modules(names: list[str] | None) -> None:
    """``--import MODULE``: import a module (dotted name on the path or from the working
    directory, or a ``.py`` file) that registers tasks or methods of one's own."""
    for name in names or []:
        if name.endswith(".py"):
            path = Path(name)
            if not path.is_file():
                raise UsageError(f"--import {name}: no such file")
            spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[path.stem] = module
            spec.loader.exec_module(module)
            continue
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as err:
            raise UsageError(f"--import {name}: {err}") from None


def cmd_run(args: argparse.Namespace) -> int:
    from bilevel.bench import RunConfig, run

    import_user_modules(args.imports)
    settings = _settings(args)
    if args.method:
        settings["method"] = args.method
    for key in ("task", "method"):
        if not settings.get(key):
            raise UsageError(f"run needs a {key} (argument or config file)")
    config = RunConfig.from_dict({k: v for k, v in settings.items() if k != "methods"})
    bl.methods.method_class(config.method)
    bl.tasks.task_factory(config.task)
    out = Path(args.out or f"runs/{config.task}-{config.method}-s{config.seed}")
    if args.nproc is not None and "WORLD_SIZE" not in os.environ:
        return _launch(args, out)
    distributed.init()
    history = run(config, out, resume=args.resume, progress=not args.quiet)
    main = distributed.is_main()
    distributed.close()
    if not main:
        return 0
    if not args.quiet:
        last = history[-1] if history else {}
        shown = {k: v for k, v in last.items() if k != "oracles"}
        print(f"done: {out}  " + "  ".join(f"{k}={_short(v)}" for k, v in shown.items()))
    return 0


def _launch(args: argparse.Namespace, out: Path) -> int:
    """Re-run this command under torchrun with ``--nproc`` processes on this machine."""
    from bilevel.bench import check_output_folder

    check_int("nproc", args.nproc, 1)
    check_output_folder(out, args.resume)  # fail here, not in every rank
    argv = _without_nproc(args.argv)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={args.nproc}", "-m", "bilevel.cli", *argv]  # fmt: skip
    code = subprocess.run(command).returncode
    if code != 0:
        checkpoint = out / "checkpoint.pt"
        after = (f"finished steps are in {checkpoint}: rerun with --resume to continue"
                 if checkpoint.exists() else "no checkpoint was written")  # fmt: skip
        print(f"bilevel: error: a rank of the {args.nproc}-process run failed "
              f"(torchrun exit {code}); {after}", file=sys.stderr)  # fmt: skip
        return 1
    return 0


def _without_nproc(argv: list[str]) -> list[str]:
    kept, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item == "--nproc":
            skip = True
        elif not item.startswith("--nproc="):
            kept.append(item)
    return kept


def cmd_bench(args: argparse.Namespace) -> int:
    from bilevel.bench import bench

    import_user_modules(args.imports)
    settings = _settings(args)
    if args.methods:
        settings["methods"] = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not settings.get("task") or not settings.get("methods"):
        raise UsageError("bench needs a task and --methods a,b,c (or a config file)")
    configured_seeds = settings.pop("seeds", 3)
    seeds = int(configured_seeds if args.seeds is None else args.seeds)
    task = settings.pop("task")
    methods = settings.pop("methods")
    settings.pop("method", None)
    settings.pop("seed", None)
    bl.tasks.task_factory(task)
    for name in methods:
        bl.methods.method_class(name)
    out = Path(args.out or f"runs/bench-{args.task}")
    print(f"bench {task}: methods {', '.join(methods)}, {seeds} seed(s), "
          f"budget {settings.get('budget')} s -> {out}")  # fmt: skip
    result = bench(task, methods, out, seeds=seeds, resume=args.resume, **settings)
    print(result["table"].read_text())
    print(f"table: {result['table']}")
    for path in result["plots"]:
        print(f"plot:  {path}")
    return 0


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    """Merge, lowest first: preset, config file, command-line flags."""
    settings: dict[str, Any] = {}
    task = getattr(args, "task", None)
    if task in PRESETS:
        settings.update(PRESETS[task])
    elif task:
        settings["task"] = task
    if args.config:
        settings.update(_read_config(args.config))
    for key in RUN_KEYS:
        value = getattr(args, key, None)
        if value is not None:
            settings[key] = value
    if args.seed is not None:
        settings["seed"] = args.seed
    settings["task_options"] = {**settings.get("task_options", {}), **_pairs(args.task_option)}
    settings["method_options"] = {**settings.get("method_options", {}), **_pairs(args.option)}
    return settings


def _read_config(path: str) -> dict[str, Any]:
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise UsageError(f"cannot read config {path}: {err.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise UsageError(f"malformed config {path}: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UsageError(f"malformed config {path}: expected a mapping of settings at top level")
    return data


def _pairs(items: list[str] | None) -> dict[str, Any]:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"expected KEY=VALUE, got {item!r}")
        out[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return out


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bilevel", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list tasks and methods").set_defaults(run=cmd_list)

    check = sub.add_parser("check", help="every method vs the exact hypergradient: pass/fail")
    check.add_argument("--dim-x", type=int, default=5)
    check.add_argument("--dim-y", type=int, default=20)
    check.add_argument("--condition", type=float, default=10.0)
    check.add_argument("--seed", type=int, default=0)
    check.set_defaults(run=cmd_check)

    for name, helptext, handler in (
        ("run", "run one method on one task", cmd_run),
        ("bench", "compare methods over seeds under one budget", cmd_bench),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("task", nargs="?", help="task name (bench: or a preset: quick)")
        if name == "run":
            p.add_argument("--method", help="method name (see bilevel list)")
            p.add_argument("--nproc", type=int, help="processes, launched by torchrun")
            p.add_argument("--shard", choices=["auto", "data", "none"],
                           help="with --nproc: split meta-batches or every batch")  # fmt: skip
        else:
            p.add_argument("--methods", help="comma-separated method names")
            p.add_argument("--seeds", type=int, help="number of seeds (default 3)")
        p.add_argument("--config", help="YAML file with settings (flags override it)")
        p.add_argument("--out", help="output folder")
        p.add_argument("--resume", action="store_true", help="continue from the checkpoint")
        p.add_argument("--steps", type=int, help="outer steps (default: the task's)")
        p.add_argument("--budget", type=float, help="seconds per run, evaluation excluded")
        p.add_argument("--seed", type=int, help="seed (run) ")
        p.add_argument("--outer-optimizer", choices=["adam", "sgd"])
        p.add_argument("--outer-lr", type=float)
        p.add_argument("--log-every", type=int)
        p.add_argument("--checkpoint-every", type=int)
        p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
        p.add_argument("--box", metavar="LO,HI",
                       help="project x onto [LO, HI] after each outer step")  # fmt: skip
        p.add_argument("--option", "-o", action="append", metavar="KEY=VALUE",
                       help="method option, e.g. -o inner_steps=10 (repeatable)")  # fmt: skip
        p.add_argument("--task-option", "-t", action="append", metavar="KEY=VALUE",
                       help="task option, e.g. -t corruption=0.8 (repeatable)")  # fmt: skip
        p.add_argument("--import", dest="imports", action="append", metavar="MODULE",
                       help="import a module (or .py file) registering your own tasks or "
                       "methods first (repeatable)")  # fmt: skip
        p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
        p.set_defaults(run=handler)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return args.run(args)
    except (ValueError, TypeError, OSError, DataError, RuntimeError, bl.NonFiniteError) as err:
        message = str(err).strip().splitlines()
        print(f"bilevel: error: {message[-1] if message else type(err).__name__}",
              file=sys.stderr)  # fmt: skip
        return 2
    except KeyboardInterrupt:
        print("bilevel: interrupted (resume with --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
