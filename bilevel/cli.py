"""The ``bilevel`` command line.

    bilevel list                                    tasks and methods
    bilevel check                                   every method vs an exact hypergradient
    bilevel run TASK --method M [options]           one run into a results folder
    bilevel run TASK --import my_tasks ...          with a task registered by your module
    bilevel bench TASK --methods a,b --budget S --seeds N [--out DIR]
    bilevel bench quick                             the embedded-default comparison

Options can also come from a YAML file (``--config``); command-line flags win. Option values
are read by the type each option is declared with (``-o inner_lr=1e-3`` is a number).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

import bilevel as bl
from bilevel import distributed, runfolder
from bilevel.checks import check_int, field_types
from bilevel.data.errors import DataError
from bilevel.methods.base import method_class
from bilevel.option_values import coerce_options, parameter_types

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
    if isinstance(settings.get("methods"), list) and args.task not in PRESETS:
        raise UsageError("run takes one method (method: NAME); methods: [...] is for bench")
    for key in ("methods", "seeds"):  # a bench preset's keys
        settings.pop(key, None)
    _typed(settings, [settings["method"]])
    config = RunConfig.from_dict(settings)
    out = Path(args.out or f"runs/{config.task}-{config.method}-s{config.seed}")
    if args.nproc is not None and "WORLD_SIZE" not in os.environ:
        return _launch(args, config, out)
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


def _launch(args: argparse.Namespace, config, out: Path) -> int:
    """Re-run this command under torchrun with ``--nproc`` processes on this machine, once
    the run is checked here (not in every rank). SIGINT and SIGTERM go to every process of
    the run; this returns only when none is left."""
    check_int("nproc", args.nproc, 1)
    _check_distributed_run(config, out, args.resume, args.nproc)
    argv = _without_nproc(args.argv)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={args.nproc}", "-m", "bilevel.cli", *argv]  # fmt: skip
    received: list[int] = []
    # torchrun and its ranks get their own process group, so a signal reaches all of them;
    # if this launcher is killed outright, torchrun gets SIGTERM and stops its ranks
    proc = subprocess.Popen(
        command, start_new_session=True, preexec_fn=runfolder.die_with_parent(signal.SIGTERM)
    )

    def forward(signum: int, frame: object) -> None:
        received.append(signum)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = proc.wait()
        _wait_for_group(proc.pid)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if received:
        print(f"bilevel: interrupted: every process of the run has stopped; resume {out} "
              "with --resume", file=sys.stderr)  # fmt: skip
        return 128 + received[0]
    if code != 0:
        checkpoint = out / "checkpoint.pt"
        after = (f"finished steps are in {checkpoint}: rerun with --resume to continue"
                 if checkpoint.exists() else "no checkpoint was written")  # fmt: skip
        print(f"bilevel: error: a rank of the {args.nproc}-process run failed "
              f"(torchrun exit {code}); {after}", file=sys.stderr)  # fmt: skip
        return 1
    return 0


def _check_distributed_run(config, out: Path, resume: bool, ranks: int) -> None:
    """Everything a rank would refuse, found before launch: the settings, the folder, the
    checkpoint and settings of a resume, and batches that do not split over the ranks."""
    from bilevel.bench import CHECKPOINT, check_output_folder, check_resumable, prepare
    from bilevel.solve import load_checkpoint

    prepared = prepare(config)
    check_output_folder(out, resume)
    if resume and (out / CHECKPOINT).exists():
        check_resumable(out, config, prepared, load_checkpoint(out / CHECKPOINT)["step"])
    problem = prepared.task.problem
    split = {"auto": ["task"] if problem.task_data is not None else [],
             "data": ["task", "lower", "upper"], "none": []}[config.shard]  # fmt: skip
    for which in split:
        data = getattr(problem, f"{which}_data")
        if data is None:
            continue
        rows = distributed.leading_size(next(iter(data)))
        if rows % ranks:
            what = "meta-batch" if which == "task" else f"{which} batch"
            raise ValueError(
                f"a {what} of {rows} does not split evenly over {ranks} ranks; choose a "
                f"{what} size divisible by {ranks} (task option meta_batch, batch_size, ...)"
            )


def _wait_for_group(group: int, grace: float = 30.0) -> None:
    """Wait until no process of process group ``group`` is left; SIGKILL it after ``grace``
    seconds."""
    deadline = time.monotonic() + grace
    while True:
        try:
            os.killpg(group, 0)
        except (ProcessLookupError, PermissionError):
            return
        if time.monotonic() > deadline:
            os.killpg(group, signal.SIGKILL)
            deadline = float("inf")
        time.sleep(0.05)


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
    if "method" in settings:
        raise UsageError("bench takes methods (--methods a,b or methods: [a, b]), not method")
    if "shard" in settings:
        raise UsageError("shard applies to bilevel run --nproc only, not to bench")
    if not settings.get("task") or not settings.get("methods"):
        raise UsageError("bench needs a task and --methods a,b,c (or a config file)")
    if args.seeds is not None:
        settings["seeds"] = args.seeds
    seeds = settings.pop("seeds", 3)
    task = settings.pop("task")
    methods = settings.pop("methods")
    if not isinstance(methods, list) or not all(isinstance(m, str) for m in methods):
        raise UsageError(f"methods must be a list of method names, got {methods!r}")
    check_int("seeds", seeds, 1)
    bl.tasks.task_factory(task)
    for name in methods:
        bl.methods.method_class(name)
    _typed(settings, methods)
    out = Path(args.out or f"runs/bench-{task}")
    result = bench(task, methods, out, seeds=seeds, resume=args.resume, quiet=args.quiet,
                   **settings)  # fmt: skip
    print(result["table"].read_text())
    print(f"table: {result['table']}")
    for path in result["plots"]:
        print(f"plot:  {path}")
    return 0


def _typed(settings: dict[str, Any], methods: list[str]) -> None:
    """Read option values by their declared types, in place: task options by the task
    factory's annotations, method options by the first of ``methods`` that has them."""
    task = settings.get("task")
    for key in ("task_options", "method_options"):
        if not isinstance(settings.get(key), dict):
            raise UsageError(f"{key} must be a mapping of KEY: VALUE, got {settings.get(key)!r}")
    if task:
        types = parameter_types(bl.tasks.task_factory(task))
        settings["task_options"] = coerce_options(settings["task_options"], types, "task option")
    types = {}
    for name in reversed(methods):
        types.update(field_types(method_class(name)))
    options = settings["method_options"]
    scoped = {k: v for k, v in options.items() if isinstance(v, dict)}
    settings["method_options"] = {
        **coerce_options({k: v for k, v in options.items() if k not in scoped}, types,
                         "method option"),
        **{m: coerce_options(v, field_types(method_class(m)), f"method option {m}.")
           for m, v in scoped.items()},
    }  # fmt: skip


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
    options = dict(settings.get("method_options") or {})
    for key, value in _pairs(args.option).items():  # METHOD.KEY=VALUE: for that method only
        method, dot, name = key.partition(".")
        if dot:
            options[method] = {**(options.get(method) or {}), name: value}
        else:
            options[key] = value
    settings["method_options"] = options
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
        out[key.strip().replace("-", "_")] = value  # read by its type later (_typed)
    return out


def error_lines(err: BaseException) -> list[str]:
    """The whole message of ``err``, one line per line of it, then each chained cause whose
    text it does not already hold."""
    lines = str(err).strip().splitlines() or [type(err).__name__]
    text = "\n".join(lines)
    cause = err.__cause__
    while cause is not None:
        message = str(cause).strip()
        if message and message not in text:
            lines.append(f"caused by: {message.splitlines()[0]}")
            text += "\n" + message
        cause = cause.__cause__
    return [line.strip() for line in lines if line.strip()]


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bilevel", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
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
        p.add_argument("--seed", type=int,
                       help="seed (bench: the first seed; runs use seed, seed+1, ...)")  # fmt: skip
        p.add_argument("--outer-optimizer", choices=["adam", "sgd"])
        p.add_argument("--outer-lr", type=float)
        p.add_argument("--log-every", type=int)
        p.add_argument("--checkpoint-every", type=int)
        p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
        p.add_argument("--box", metavar="LO,HI",
                       help="project x onto [LO, HI] after each outer step")  # fmt: skip
        p.add_argument("--option", "-o", action="append", metavar="KEY=VALUE",
                       help="method option, e.g. -o inner_steps=10, or -o METHOD.KEY=VALUE "
                            "for one method only (repeatable)")  # fmt: skip
        p.add_argument("--task-option", "-t", action="append", metavar="KEY=VALUE",
                       help="task option, e.g. -t corruption=0.8 (repeatable)")  # fmt: skip
        p.add_argument("--import", dest="imports", action="append", metavar="MODULE",
                       help="import a module (or .py file) registering your own tasks or "
                       "methods first (repeatable)")  # fmt: skip
        p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show tracebacks of errors")  # fmt: skip
        p.set_defaults(run=handler)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return args.run(args)
    except (ValueError, TypeError, OSError, DataError, RuntimeError, bl.NonFiniteError) as err:
        if args.debug:
            raise
        lines = error_lines(err)
        print("bilevel: error: " + "\n  ".join(lines), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bilevel: interrupted (resume with --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
