"""Runs and benchmarks: one method on one task into a results folder, several methods over
seeds under one time budget, and the table and plots that compare them.

A run folder holds ``config.yaml`` (everything needed to repeat it), ``metrics.jsonl`` (one
row per logged step, streamed as it is produced) and ``checkpoint.pt`` (periodic and final).
The guarantees (docs/cli.md): one writer per folder (:mod:`bilevel.runfolder`); every setting
checked before anything is written; a folder with a checkpoint is continued only with
``resume=True`` and only with the settings it was started with, rewriting ``metrics.jsonl``
from the checkpoint so no row is lost or duplicated; a folder without one starts from step 0.
"""

from __future__ import annotations

import inspect
import json
import math
import platform
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch
import yaml

import bilevel as bl
from bilevel import distributed, runfolder, tasks
from bilevel.checks import (
    check_device,
    check_fields,
    check_int,
    check_positive,
    field_types,
)
from bilevel.methods.base import Method, method_class
from bilevel.option_values import coerce_options, parameter_types
from bilevel.projections import box, parse_box
from bilevel.solve import OUTER_OPTIMIZERS, load_checkpoint
from bilevel.tasks.base import Task

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
CHECKPOINT = "checkpoint.pt"
BENCH = "bench.yaml"
# written when a run stopped on NaN/Inf (bl.NonFiniteError): a benchmark records it as that
# seed's outcome and goes on, and does not rerun it on resume
STOPPED = "stopped.yaml"
SHARDS = ("auto", "data", "none")
# settings a resume may change: they decide when the run stops and how fast it goes, not what
# its finished steps mean (steps may not drop below the steps already done)
RESUME_MAY_CHANGE = ("steps", "budget", "threads", "checkpoint_every")


@dataclass
class RunConfig:
    """Everything that defines one run. Task and method options override the task's
    recommended defaults; ``steps``/``outer_*`` of ``None`` take the task's defaults.
    Every field is checked at construction (type from its annotation, then range)."""

    task: str
    method: str
    task_options: dict[str, Any] = field(default_factory=dict)
    method_options: dict[str, Any] = field(default_factory=dict)
    steps: int | None = None
    budget: float | None = None
    outer_optimizer: str | None = None
    outer_lr: float | None = None
    seed: int = 0
    log_every: int = 1
    checkpoint_every: int = 25
    threads: int | None = None
    shard: str = "auto"  # under torchrun: "auto" splits meta-batches, "data" every batch
    box: list[float] | str | None = None  # project x onto [lo, hi] ("LO,HI" or a pair)

    def __post_init__(self) -> None:
        check_fields(self)
        for name in ("steps", "threads"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), 1)
        for name in ("budget", "outer_lr"):
            if getattr(self, name) is not None:
                check_positive(name, getattr(self, name))
        if self.outer_optimizer is not None and self.outer_optimizer not in OUTER_OPTIMIZERS:
            raise ValueError(
                f"outer_optimizer must be one of {', '.join(OUTER_OPTIMIZERS)}, "
                f"got {self.outer_optimizer!r}"
            )
        check_int("seed", self.seed, 0)
        check_int("log_every", self.log_every, 1)
        check_int("checkpoint_every", self.checkpoint_every, 1)
        if self.shard not in SHARDS:
            raise ValueError(f"shard must be one of {', '.join(SHARDS)}, got {self.shard!r}")
        if self.box is not None:
            self.box = parse_box(self.box)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        """From a settings mapping (a config file): unknown keys are refused, string values
        read by each field's type (so ``outer_lr: 1e-3`` is a number)."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"unknown run setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        return cls(**coerce_options(data, field_types(cls), "setting"))


@dataclass
class Prepared:
    """A checked run, ready to start: the task, the method and the outer loop's options."""

    task: Task
    method: Method
    solve_options: dict[str, Any]
    task_options: dict[str, Any]  # every option of the task factory, defaults included


def prepare(config: RunConfig, task: Task | None = None) -> Prepared:
    """Build the task (unless given) and the method and resolve the outer loop's options:
    every setting is checked here, before anything is written."""
    options = task_options(config)
    if task is None:
        task = tasks.make(config.task, seed=config.seed, **options)
    cls = method_class(config.method)
    method_options = coerce_options(
        options_for(config.method, config.method_options), field_types(cls), "method option"
    )
    method = bl.method(config.method, **task.method_options(config.method, **method_options))
    solve_options = {
        **{"steps": 100, "outer_optimizer": "adam", "outer_lr": 1e-3},
        **task.solve_defaults,
    }
    for key in ("steps", "outer_optimizer", "outer_lr"):
        if getattr(config, key) is not None:
            solve_options[key] = getattr(config, key)
    if config.budget is not None and config.steps is None:
        solve_options["steps"] = 10**9  # the budget decides
    factory = tasks.task_factory(config.task)
    defaults = {name: p.default for name, p in _parameters(factory).items() if name != "seed"}
    return Prepared(task, method, solve_options, {**defaults, **options})


def options_for(method: str, options: dict[str, Any]) -> dict[str, Any]:
    """``method``'s options from a mapping that may hold some for one method only
    (``{"inner_steps": 5, "stocbio": {"solver_iters": 10}}``, as ``-o stocbio.solver_iters=10``
    gives); options scoped to another method are refused."""
    scoped = {k: v for k, v in options.items() if isinstance(v, dict)}
    others = sorted(set(scoped) - {method})
    if others:
        raise ValueError(
            f"method options for {', '.join(others)} given to a run of {method}"
        )
    return {**{k: v for k, v in options.items() if k not in scoped}, **scoped.get(method, {})}


def load_finished_run(
    run: Path, task: str, **task_overrides: Any
) -> tuple[RunConfig, Task, dict[str, Any]]:
    """A finished run's config, its task rebuilt (same seed and options, ``task_overrides``
    on top) and its final checkpoint, for evaluations after the fact. Raises ``SystemExit``
    with one line when the run is of another task or did not reach its last step."""
    config = RunConfig.from_dict(yaml.safe_load((run / CONFIG).read_text())["run"])
    if config.task != task:
        raise SystemExit(f"{run}: task {config.task!r}, not {task}")
    checkpoint = load_checkpoint(run / CHECKPOINT)
    if config.steps is None or checkpoint["step"] != config.steps:
        raise SystemExit(f"{run}: checkpoint at step {checkpoint['step']} of {config.steps}")
    options = {**task_options(config), **task_overrides}
    return config, tasks.make(config.task, seed=config.seed, **options), checkpoint


def task_options(config: RunConfig) -> dict[str, Any]:
    """The run's task options read by the factory's parameter types, devices checked."""
    factory = tasks.task_factory(config.task)
    types = parameter_types(factory)
    options = coerce_options(config.task_options, types, "task option")
    if "seed" in options:
        raise ValueError("the task's seed is the run's: use --seed (run) or --seed/--seeds (bench)")
    for name, value in options.items():
        if name == "device" or types.get(name) is torch.device:
            check_device(f"task option {name}", value)
    return options


def _parameters(factory) -> dict[str, Any]:
    return {
        name: p
        for name, p in inspect.signature(factory).parameters.items()
        if p.default is not inspect.Parameter.empty
    }


def run(config: RunConfig, out: str | Path, resume: bool = False, progress: bool = True) -> list:
    """Run ``config`` into folder ``out``; return the history rows.

    Raises ``FileExistsError`` if ``out`` holds a checkpointed run and ``resume`` is False,
    ``ValueError`` if ``resume`` is True and the settings differ from the recorded ones, and
    :class:`~bilevel.runfolder.FolderInUseError` if another process writes into ``out``.
    """
    out = Path(out)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    prepared = prepare(config)
    _shard(prepared.task.problem, config.shard)
    if not distributed.is_main():  # under torchrun, rank 0 alone writes files
        return _solve(config, prepared, out, None, progress=False)
    check_output_folder(out, resume)
    _prepare_folder(out)
    with runfolder.exclusive(out):
        _check_run_contents(out, resume)  # again: it may have changed before the lock
        rows: list[dict[str, Any]] = []
        if resume and (out / CHECKPOINT).exists():
            payload = load_checkpoint(out / CHECKPOINT)  # a bad one changes nothing here
            check_resumable(out, config, prepared, payload["step"])
            rows = payload["history"]
        elif resume and progress:
            print(f"no completed step in {out}: starting from step 0", file=sys.stderr)
        (out / CONFIG).write_text(yaml.safe_dump(_record(config, prepared), sort_keys=False))
        (out / STOPPED).unlink(missing_ok=True)  # a continued run gets a new outcome
        with open(out / METRICS, "w") as stream:
            for row in rows:  # rows after the checkpoint are recomputed, not kept twice
                _write_row(stream, row)
            try:
                return _solve(config, prepared, out, stream, progress)
            except bl.NonFiniteError as err:
                record = {"reason": "non-finite", "message": str(err)}
                (out / STOPPED).write_text(yaml.safe_dump(record, sort_keys=False))
                raise


def _shard(problem, how: str) -> None:
    """Under torchrun: split meta-batches (``auto``, when the task has them) or every batch
    (``data``) over the ranks; a no-op in a single process."""
    if how == "data":
        distributed.shard_data(problem)
    elif how == "auto" and problem.task_data is not None:
        distributed.shard_tasks(problem)


def _solve(
    config: RunConfig, prepared: Prepared, out: Path, stream: TextIO | None, progress: bool
) -> list[dict[str, Any]]:
    task = prepared.task
    result = bl.solve(
        task.problem, task.x0, task.y0, prepared.method,
        callbacks=task.callbacks, checkpoint=out / CHECKPOINT,
        checkpoint_every=config.checkpoint_every, seed=config.seed,
        log_every=config.log_every, progress=progress and stream is not None,
        time_budget=config.budget,
        on_log=None if stream is None else (lambda row: _write_row(stream, row)),
        project=None if config.box is None else box(*config.box), **prepared.solve_options,
    )  # fmt: skip
    return result.history


def _write_row(stream: TextIO, row: dict[str, Any]) -> None:
    # allow_nan=False: a NaN/Infinity is never written (it is not JSON); solve raises first
    stream.write(json.dumps(row, allow_nan=False) + "\n")
    stream.flush()


def check_output_folder(out: Path, resume: bool) -> None:
    """Refuse a folder another process writes into, a checkpointed run without ``resume``,
    and ``resume`` of a folder holding no run. A folder without a checkpoint (no completed
    step) may be rerun or resumed: both start from step 0."""
    runfolder.check_free(out)
    _check_run_contents(out, resume)


def _check_run_contents(out: Path, resume: bool) -> None:
    checkpointed = (out / CHECKPOINT).exists()
    if checkpointed and not resume:
        raise FileExistsError(
            f"{out} already holds a run with completed steps ({CHECKPOINT}); continue it with "
            "--resume or choose another --out"
        )
    if resume and not checkpointed and not (out / CONFIG).exists():
        raise FileNotFoundError(f"nothing to resume: {out} holds no run")
    if resume and checkpointed and not (out / CONFIG).exists():
        raise FileNotFoundError(
            f"cannot resume {out}: {CHECKPOINT} has no {CONFIG} beside it to check the "
            "settings against; choose another --out"
        )


def check_resumable(out: Path, config: RunConfig, prepared: Prepared, done: int) -> None:
    """Refuse to continue a run with settings other than those it was started with."""
    try:
        recorded = yaml.safe_load((out / CONFIG).read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"cannot resume {out}: unreadable {CONFIG} ({err})") from None
    if not isinstance(recorded, dict):
        raise ValueError(f"cannot resume {out}: {CONFIG} is not a run record")
    now = yaml.safe_load(yaml.safe_dump(_record(config, prepared), sort_keys=False))
    old, new = _identity(recorded), _identity(now)
    for key in ("task", "method"):
        if old[key] != new[key]:
            raise ValueError(
                f"cannot resume {out}: it holds a run of {key} {old[key]}, not {new[key]}"
            )
    changed = differences(old, new)
    if changed:
        raise ValueError(
            f"cannot resume {out} with changed settings: {'; '.join(changed)}; resume with "
            f"the settings in {out / CONFIG} or choose another --out"
        )
    steps = prepared.solve_options["steps"]
    if steps < done:
        raise ValueError(f"cannot resume {out} with steps {steps}: {done} steps are already done")


def _identity(record: dict[str, Any]) -> dict[str, Any]:
    """What a resume must keep: everything but ``RESUME_MAY_CHANGE``, resolved values compared
    (so an option given explicitly at its default is no change)."""
    run_part = record.get("run") or {}
    resolved = record.get("resolved") or {}
    solve = resolved.get("solve") or {}
    return {
        "task": run_part.get("task"),
        "method": run_part.get("method"),
        "seed": run_part.get("seed"),
        "task_options": resolved.get("task_options", run_part.get("task_options")),
        "method_options": resolved.get("method_options"),
        "outer_optimizer": solve.get("outer_optimizer"),
        "outer_lr": solve.get("outer_lr"),
        "log_every": run_part.get("log_every"),
        "shard": run_part.get("shard"),
        "box": run_part.get("box"),
    }


def differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """``"key: old -> new"`` for every leaf that differs (nested mappings by dotted keys)."""
    out = []
    for key in list(old) + [k for k in new if k not in old]:
        a, b = old.get(key), new.get(key)
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(differences(a, b, f"{name}."))
        elif a != b:
            out.append(f"{name} {_show(a)} -> {_show(b)}")
    return out


def _show(value: Any) -> str:
    return "(unset)" if value is None else str(value)


def _prepare_folder(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise OSError(f"cannot write to output folder {out}: {err.strerror or err}") from None


def _record(config: RunConfig, prepared: Prepared) -> dict[str, Any]:
    """What ``config.yaml`` holds."""
    task, method = prepared.task, prepared.method
    return {
        "run": _plain(asdict(config)),
        "resolved": {
            "method_options": {k: _plain(getattr(method, k)) for k in method.option_names()},
            "solve": _plain(prepared.solve_options),
            "task_options": _plain(prepared.task_options),
            "task_metadata": {k: _plain(v) for k, v in task.metadata.items()},
        },
        "environment": {
            "torch": str(torch.__version__),
            "python": platform.python_version(),
            "threads": torch.get_num_threads(),
            "ranks": distributed.world_size(),
            "device": str(next(iter(task.x0.values())).device),
            "bilevel": bl.__version__,
        },
    }


def _plain(value: Any) -> Any:
    """A YAML-safe view of a value (dtypes by name; tensors and objects become short strings)."""
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, torch.device):
        return str(value)
    if isinstance(value, (list, tuple)) and len(value) <= 20:
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    return f"<{type(value).__name__}>"


def read_metrics(folder: str | Path) -> list[dict[str, Any]]:
    path = Path(folder) / METRICS
    if not path.exists():
        raise FileNotFoundError(f"no {METRICS} in {folder}")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------------------- benchmark
def bench(
    task: str,
    methods: list[str],
    out: str | Path,
    budget: float | None = None,
    seeds: int = 3,
    resume: bool = False,
    seed: int = 0,
    quiet: bool = False,
    **run_settings: Any,
) -> dict[str, Any]:
    """Run every method × seed (seeds ``seed``, ``seed + 1``, ...; each run in its own
    process, so peak memory is per run), then write ``table.md`` and the plots. Returns
    ``{"table": path, "plots": [paths]}``.

    ``out`` records the invocation in ``bench.yaml``: a folder holding another benchmark is
    refused, this one is continued only with ``resume=True`` (finished runs are kept,
    interrupted ones continued, missing ones started), and the table shows only its runs.
    A run that stops on NaN/Inf is that seed's result: its folder holds ``stopped.yaml``, the
    table says "non-finite" under "stopped by", the benchmark goes on, and a resume keeps it.
    """
    out = Path(out)
    check_int("seeds", seeds, 1)
    check_int("seed", seed, 0)
    if not methods or len(set(methods)) != len(methods):
        raise ValueError(f"bench needs distinct method names, got {methods!r}")
    settings = dict(run_settings)
    options = settings.pop("method_options", None) or {}
    unknown = sorted(k for k, v in options.items() if isinstance(v, dict) and k not in methods)
    if unknown:
        raise ValueError(f"method options for {', '.join(unknown)}, which is not benchmarked")
    scoped = {m: {k: v for k, v in options.items() if not isinstance(v, dict) or k == m}
              for m in methods}  # fmt: skip
    configs = [RunConfig(task=task, method=m, seed=seed + s, budget=budget,
                         method_options=options_for(m, scoped[m]), **settings)
               for m in methods for s in range(seeds)]  # fmt: skip
    reference_task = tasks.make(task, seed=seed, **task_options(configs[0]))
    for config in configs[::seeds]:  # every method's options checked before any run starts
        prepare(config, reference_task)
    record = _plain({"task": task, "methods": methods, "seeds": seeds, "seed": seed,
                     "budget": budget, **run_settings})  # fmt: skip
    _check_bench_folder(out, record, resume)
    folders = [out / f"{c.method}-s{c.seed}" for c in configs]
    for folder in folders:
        runfolder.check_free(folder)  # a run left by a killed benchmark may still write
    _prepare_folder(out)
    with runfolder.exclusive(out):
        _check_bench_contents(out, record, resume)
        (out / BENCH).write_text(yaml.safe_dump(record, sort_keys=False))
        if not quiet:
            seed_list = f"seed {seed}" if seeds == 1 else f"seeds {seed}..{seed + seeds - 1}"
            limit = f"budget {budget:g} s" if budget else "no time budget"
            print(f"bench {task}: methods {', '.join(methods)}, {seed_list}, {limit} -> {out}",
                  flush=True)  # fmt: skip
        for config, folder in zip(configs, folders, strict=True):
            if resume and (folder / STOPPED).exists():
                continue  # it stopped on NaN/Inf: rerunning it would only repeat that
            again = resume and ((folder / CONFIG).exists() or (folder / CHECKPOINT).exists())
            _run_subprocess(config, folder, again, quiet)
        runs = collect(out, folders)
        stops = {m: [stop_reason(f) for f in folders if f.name.rsplit("-s", 1)[0] == m]
                 for m in methods}  # fmt: skip
        references = reference_task.references() if reference_task.references else {}
        table = out / "table.md"
        table.write_text(markdown_table(runs, budget, references, stops))
        from bilevel.plots import plot_runs  # matplotlib only when plotting

        plots = plot_runs(runs, out)
    return {"table": table, "plots": plots}


def _check_bench_folder(out: Path, record: dict[str, Any], resume: bool) -> None:
    runfolder.check_free(out)
    _check_bench_contents(out, record, resume)


def _check_bench_contents(out: Path, record: dict[str, Any], resume: bool) -> None:
    path = out / BENCH
    if path.exists():
        try:
            recorded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ValueError(f"unreadable {path}: {str(err).splitlines()[0]}") from None
        # a resume may change what decides when the runs stop (each run still refuses to
        # drop below its steps done); bench.yaml then records the new values
        fixed = RESUME_MAY_CHANGE if resume else ()
        changed = differences(
            {k: v for k, v in (recorded if isinstance(recorded, dict) else {}).items()
             if k not in fixed},
            {k: v for k, v in record.items() if k not in fixed},
        )  # fmt: skip
        if changed:
            raise ValueError(
                f"{out} holds a benchmark with other settings ({'; '.join(changed)}); "
                f"choose another --out, or delete {out} to start over"
            )
        if not resume:
            raise FileExistsError(
                f"{out} already holds this benchmark; complete it with --resume or choose "
                "another --out"
            )
    elif resume:
        raise FileNotFoundError(f"nothing to resume: {out} holds no benchmark ({BENCH})")
    elif out.exists() and any(p.name != runfolder.LOCK for p in out.iterdir()):
        raise FileExistsError(f"{out} is not empty and holds no {BENCH}: choose a new --out")


def _run_subprocess(config: RunConfig, folder: Path, resume: bool, quiet: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    spec = folder / "run-request.yaml"
    spec.write_text(yaml.safe_dump(_plain(asdict(config))))
    cmd = [sys.executable, "-m", "bilevel.cli", "run", "--config", str(spec), "--out",
           str(folder), "--quiet"] + (["--resume"] if resume else [])  # fmt: skip
    if not quiet:
        print(f"  {config.method} seed {config.seed} ...", flush=True)
    # the run dies with this process (kill -9 included): no orphan keeps writing
    done = subprocess.run(
        cmd, capture_output=True, text=True, preexec_fn=runfolder.die_with_parent()
    )
    if done.returncode != 0:
        lines = [line.removeprefix("bilevel: error: ")
                 for line in done.stderr.strip().splitlines()[-20:]]  # fmt: skip
        if (folder / STOPPED).exists():  # a result (the method diverged), not a failure
            print(f"  {config.method} seed {config.seed} stopped on NaN/Inf: {lines[-1]}",
                  file=sys.stderr, flush=True)  # fmt: skip
            return
        raise RuntimeError(
            f"run {config.method} seed {config.seed} failed (exit {done.returncode}): "
            + "\n".join(lines)
        )


def stop_reason(folder: Path) -> str:
    """What ended the run in ``folder``: ``"steps"``, ``"budget"``, ``"non-finite"`` (it
    stopped on NaN/Inf, see its ``stopped.yaml``) or ``"unfinished"``."""
    if (folder / STOPPED).exists():
        return "non-finite"
    try:
        record = yaml.safe_load((folder / CONFIG).read_text())
        rows = read_metrics(folder)
    except (OSError, yaml.YAMLError):
        return "unfinished"
    steps = record["resolved"]["solve"]["steps"]
    budget = record["run"].get("budget")
    if rows and rows[-1]["step"] >= steps:
        return "steps"
    if rows and budget is not None and rows[-1]["seconds"] >= budget:
        return "budget"
    return "unfinished"


def collect(
    out: Path, folders: list[Path] | None = None
) -> dict[str, list[list[dict[str, Any]]]]:
    """{method: [rows of the first seed, of the second, ...]} from the run ``folders`` of a
    bench folder (default: every run folder in it) that hold rows."""
    if folders is None:
        folders = sorted(p for p in Path(out).iterdir() if (p / METRICS).exists())
    runs: dict[str, list[list[dict[str, Any]]]] = {}
    for folder in folders:
        rows = read_metrics(folder) if (folder / METRICS).exists() else []
        if rows:
            runs.setdefault(folder.name.rsplit("-s", 1)[0], []).append(rows)
    return runs


def total_oracles(row: dict[str, Any]) -> int:
    return int(sum(row["oracles"].values()))


def metric_names(runs: dict[str, list[list[dict[str, Any]]]]) -> list[str]:
    """Numeric task metrics present in the rows (besides the bookkeeping columns)."""
    skip = {"step", "seconds", "cpu_seconds", "oracles", "peak_memory_mb"}
    names: list[str] = []
    for histories in runs.values():
        for rows in histories:
            for key, value in rows[-1].items():
                if key not in skip and isinstance(value, (int, float)) and key not in names:
                    names.append(key)
    return names


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    t = torch.tensor(values, dtype=torch.float64)
    q = torch.quantile(t, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
    return float(q[1]), float(q[0]), float(q[2])


def markdown_table(
    runs: dict[str, list[list[dict[str, Any]]]],
    budget: float | None,
    references: dict[str, dict[str, float]] | None = None,
    stops: dict[str, list[str]] | None = None,
) -> str:
    """Median [IQR] over seeds of each metric at the end of each run, then one row per
    reference point (first seed). ``stops`` ({method: [what stopped each seed's run]}, see
    :func:`stop_reason`) gives the headline and a "stopped by" column, and a row (its seeds
    counted) also for a method whose runs stopped before logging a row."""
    metrics = metric_names(runs)
    columns = ["steps", "seconds", *metrics, "oracle calls", "peak MB"]
    stopped = ["stopped by"] if stops is not None else []
    lines = [f"{_headline(budget, stops)}; median [interquartile range] over seeds.", "",
             "| method | seeds | " + " | ".join(stopped + columns) + " |",
             "|---|---|" + "---|" * len(stopped + columns)]  # fmt: skip
    for method in dict.fromkeys([*runs, *(stops or {})]):
        histories = runs.get(method, [])
        finals = [rows[-1] for rows in histories]
        cells = []
        for column in columns:
            values = [_column(row, column) for row in finals]
            values = [v for v in values if v is not None and math.isfinite(v)]
            if not values:
                cells.append("–")
                continue
            median, low, high = _quartiles(values)
            cells.append(f"{_fmt(median)} [{_fmt(low)}, {_fmt(high)}]")
        seeds = len(histories)
        if stops is not None:
            cells.insert(0, _tally(stops.get(method, [])))
            seeds = max(seeds, len(stops.get(method, [])))
        lines.append(f"| {method} | {seeds} | " + " | ".join(cells) + " |")
    for name, values in (references or {}).items():
        cells = ["–"] * len(stopped) + [_fmt(values[c]) if c in values else "–" for c in columns]
        lines.append(f"| reference: {name} | 1 | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _headline(budget: float | None, stops: dict[str, list[str]] | None) -> str:
    """Say what the final values are: at the budget, after the steps, or each run's end."""
    if stops is None:
        return f"Final values at the budget ({budget:g} s)" if budget else "Final values"
    reasons = {r for rs in stops.values() for r in rs}
    if reasons == {"budget"}:
        return f"Final values at the budget ({budget:g} s)"
    if reasons == {"steps"}:
        within = f" (within the budget of {budget:g} s)" if budget else ""
        return f"Final values after all steps{within}"
    limits = " or ".join(x for x in (f"the budget of {budget:g} s" if budget else "",
                                     "all steps") if x)  # fmt: skip
    return f"Final values when each run stopped ({limits}; see 'stopped by')"


def _tally(reasons: list[str]) -> str:
    counts = {r: reasons.count(r) for r in dict.fromkeys(reasons)}
    if len(counts) == 1:
        return next(iter(counts))
    return ", ".join(f"{r} {n}" for r, n in counts.items())


def _column(row: dict[str, Any], column: str) -> float | None:
    if column == "steps":
        return float(row["step"])
    if column == "oracle calls":
        return float(total_oracles(row))
    if column == "peak MB":
        return row.get("peak_memory_mb")
    value = row.get(column)
    return float(value) if isinstance(value, (int, float)) else None


def _fmt(value: float) -> str:
    if value == 0 or 1e-3 <= abs(value) < 1e5:
        return f"{value:.4g}"
    return f"{value:.3e}"
