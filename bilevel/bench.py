"""Runs and benchmarks: one method on one task into a results folder, several methods over
seeds under one time budget, and the table and plots that compare them.

A run folder holds ``config.yaml`` (everything needed to repeat it), ``metrics.jsonl`` (one
row per logged step, streamed as it is produced) and ``checkpoint.pt`` (periodic and final;
``resume=True`` continues from it, rewriting ``metrics.jsonl`` from the checkpoint so no row is
lost or duplicated).
"""

from __future__ import annotations

import json
import math
import platform
import shutil
import subprocess
import sys
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

import bilevel as bl
from bilevel import distributed, tasks
from bilevel.projections import box, parse_box

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
CHECKPOINT = "checkpoint.pt"


@dataclass
class RunConfig:
    """Everything that defines one run. Task and method options override the task's
    recommended defaults; ``steps``/``outer_*`` of ``None`` take the task's defaults."""

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
        if self.box is not None:
            self.box = parse_box(self.box)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"unknown run setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        return cls(**data)


def run(config: RunConfig, out: str | Path, resume: bool = False, progress: bool = True) -> list:
    """Run ``config`` into folder ``out``; return the history rows.

    Raises ``FileExistsError`` if ``out`` already holds results and ``resume`` is False.
    """
    out = Path(out)
    checkpoint = out / CHECKPOINT
    main = distributed.is_main()  # under torchrun, rank 0 alone writes files
    if main:
        check_output_folder(out, resume)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    task = tasks.make(config.task, seed=config.seed, **config.task_options)
    _shard(task.problem, config.shard)
    method = bl.method(config.method, **task.method_options(config.method, **config.method_options))
    solve_options = {
        **{"steps": 100, "outer_optimizer": "adam", "outer_lr": 1e-3},
        **task.solve_defaults,
    }
    for key in ("steps", "outer_optimizer", "outer_lr"):
        if getattr(config, key) is not None:
            solve_options[key] = getattr(config, key)
    if config.budget is not None and config.steps is None:
        solve_options["steps"] = 10**9  # the budget decides
    if main:
        _prepare_folder(out)
        _write_config(out, config, task, method, solve_options)
        if resume:
            _truncate_metrics(out, checkpoint)
    with open(out / METRICS, "a") if main else nullcontext() as stream:

        def write(row: dict[str, Any]) -> None:
            stream.write(json.dumps(row) + "\n")
            stream.flush()

        result = bl.solve(
            task.problem, task.x0, task.y0, method,
            callbacks=task.callbacks, checkpoint=checkpoint,
            checkpoint_every=config.checkpoint_every, seed=config.seed,
            log_every=config.log_every, progress=progress and main, time_budget=config.budget,
            on_log=write if main else None,
            project=None if config.box is None else box(*config.box), **solve_options,
        )  # fmt: skip
    return result.history


def check_output_folder(out: Path, resume: bool) -> None:
    """Refuse to overwrite a finished or interrupted run, or to resume a missing one."""
    if not resume and (out / METRICS).exists():
        raise FileExistsError(
            f"{out} already holds a run; resume it with --resume or choose another --out"
        )
    if resume and not (out / CHECKPOINT).exists():
        raise FileNotFoundError(f"nothing to resume: {out / CHECKPOINT} does not exist")


def _shard(problem, how: str) -> None:
    """Under torchrun: split meta-batches (``auto``, when the task has them) or every batch
    (``data``) over the ranks; a no-op in a single process."""
    if how not in ("auto", "data", "none"):
        raise ValueError(f"shard must be auto, data or none, got {how!r}")
    if how == "data":
        distributed.shard_data(problem)
    elif how == "auto" and problem.task_data is not None:
        distributed.shard_tasks(problem)


def _prepare_folder(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise OSError(f"cannot write to output folder {out}: {err.strerror or err}") from None


def _write_config(out: Path, config: RunConfig, task, method, solve_options: dict) -> None:
    record = {
        "run": asdict(config),
        "resolved": {
            "method_options": {k: _plain(getattr(method, k)) for k in method.option_names()},
            "solve": solve_options,
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
    (out / CONFIG).write_text(yaml.safe_dump(record, sort_keys=False))


def _plain(value: Any) -> Any:
    """A YAML-safe view of a metadata value (tensors and objects become short strings)."""
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, (list, tuple)) and len(value) <= 20:
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    return f"<{type(value).__name__}>"


def _truncate_metrics(out: Path, checkpoint: Path) -> None:
    """Rows logged after the last checkpoint will be recomputed: rewrite the file from it."""
    history = torch.load(checkpoint, weights_only=True)["history"]
    with open(out / METRICS, "w") as stream:
        for row in history:
            stream.write(json.dumps(row) + "\n")


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
    **run_settings: Any,
) -> dict[str, Any]:
    """Run every method × seed (each in its own process, so peak memory is per run), then
    write ``table.md`` and the plots. Returns ``{"table": path, "plots": [paths]}``."""
    out = Path(out)
    _prepare_folder(out)
    for method in methods:
        bl.methods.method_class(method)  # unknown names fail before any run starts
        for seed in range(seeds):
            folder = out / f"{method}-s{seed}"
            if not resume and folder.exists():
                shutil.rmtree(folder)
            config = RunConfig(task=task, method=method, seed=seed, budget=budget, **run_settings)
            _run_subprocess(config, folder, resume and (folder / CHECKPOINT).exists())
    runs = collect(out)
    reference_task = tasks.make(task, seed=0, **run_settings.get("task_options", {}))
    references = reference_task.references() if reference_task.references else {}
    table = out / "table.md"
    table.write_text(markdown_table(runs, budget, references))
    from bilevel.plots import plot_runs  # matplotlib only when plotting

    plots = plot_runs(runs, out)
    return {"table": table, "plots": plots}


def _run_subprocess(config: RunConfig, folder: Path, resume: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    spec = folder / "run-request.yaml"
    spec.write_text(yaml.safe_dump(asdict(config)))
    cmd = [sys.executable, "-m", "bilevel.cli", "run", "--config", str(spec), "--out",
           str(folder), "--quiet"] + (["--resume"] if resume else [])  # fmt: skip
    print(f"  {config.method} seed {config.seed} ...", flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(
            f"run {config.method} seed {config.seed} failed: {done.stderr.strip()[-2000:]}"
        )


def collect(out: Path) -> dict[str, list[list[dict[str, Any]]]]:
    """{method: [rows of seed 0, rows of seed 1, ...]} from a bench folder."""
    runs: dict[str, list[list[dict[str, Any]]]] = {}
    for folder in sorted(p for p in Path(out).iterdir() if (p / METRICS).exists()):
        method = folder.name.rsplit("-s", 1)[0]
        runs.setdefault(method, []).append(read_metrics(folder))
    return runs


def total_oracles(row: dict[str, Any]) -> int:
    return int(sum(row["oracles"].values()))


def metric_names(runs: dict[str, list[list[dict[str, Any]]]]) -> list[str]:
    """Numeric task metrics present in the rows (besides the bookkeeping columns)."""
    skip = {"step", "seconds", "oracles", "peak_memory_mb"}
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
) -> str:
    """Median [IQR] over seeds of each metric at the end of each run (the budget), then one
    row per reference point (seed 0)."""
    metrics = metric_names(runs)
    columns = ["steps", "seconds", *metrics, "oracle calls", "peak MB"]
    head = f"Final values at the budget ({budget:g} s)" if budget else "Final values"
    lines = [f"{head}; median [interquartile range] over seeds.", "",
             "| method | seeds | " + " | ".join(columns) + " |",
             "|---|---|" + "---|" * len(columns)]  # fmt: skip
    for method, histories in runs.items():
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
        lines.append(f"| {method} | {len(histories)} | " + " | ".join(cells) + " |")
    for name, values in (references or {}).items():
        cells = [_fmt(values[c]) if c in values else "–" for c in columns]
        lines.append(f"| reference: {name} | 1 | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


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
