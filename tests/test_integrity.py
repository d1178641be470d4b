"""Runs and benchmarks never lose, duplicate or mislabel a result, and every bad input gets a
clear error (issue 15's hostile cases). Each case checks the exit status, the message and what
the folder holds afterwards; the kill tests send real SIGKILLs to real processes."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import bilevel as bl
from bilevel import runfolder
from bilevel.cli import main
from bilevel.tasks import quadratic

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
BILEVEL = [sys.executable, "-m", "bilevel.cli"]
# about 5 ms a step: long enough to kill mid-run
SLOW = ["quadratic", "--method", "cg", "-o", "inner_steps=1000", "-o", "inner_lr=1.0"]


# ------------------------------------------------------------------ helpers
def cli(capsys, *args: str) -> tuple[int, list[str]]:
    """``bilevel ARGS`` in this process: (exit status, stderr lines)."""
    capsys.readouterr()
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err.strip().splitlines()


def spawn(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([*BILEVEL, *map(str, args)], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, **kwargs)  # fmt: skip


def bilevel(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*BILEVEL, *map(str, args)], env=ENV, capture_output=True, text=True,
                          timeout=600, cwd=cwd)  # fmt: skip


def steps_of(folder: Path) -> list[int]:
    path = folder / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines()
            if line.endswith("}")]  # fmt: skip


def wait_for_rows(folder: Path, n: int, proc: subprocess.Popen, limit: float = 120) -> None:
    deadline = time.time() + limit
    while len(steps_of(folder)) < n and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed"


def snapshot(folder: Path) -> dict[str, str]:
    """Name -> content hash of every file in ``folder`` (the lock file aside)."""
    if not folder.exists():
        return {}
    return {p.name: hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(folder.iterdir()) if p.is_file() and p.name != ".lock"}  # fmt: skip


def gone(pid: int, limit: float = 10) -> bool:
    deadline = time.time() + limit
    while time.time() < deadline:
        try:
            os.kill(pid, 0)
            with open(f"/proc/{pid}/stat") as stat:  # a zombie is gone too
                if stat.read().split(")")[-1].split()[0] == "Z":
                    return True
        except (ProcessLookupError, FileNotFoundError):
            return True
        time.sleep(0.05)
    return False


def one_line(lines: list[str], *needles: str) -> None:
    assert len(lines) == 1, lines
    assert lines[0].startswith("bilevel: error: "), lines
    for needle in needles:
        assert needle in lines[0], lines


# ------------------------------------------------------------------ 1. one writer
def test_killed_benchmark_takes_its_runs_along_and_resume_keeps_every_row_once(tmp_path):
    out = tmp_path / "B"
    args = ["bench", *SLOW[:1], "--methods", "cg", "-o", "inner_steps=100", "-o",
            "inner_lr=1.0", "--seeds", "1", "--steps", "300", "--checkpoint-every", "10",
            "--out", out, "--quiet"]  # fmt: skip
    proc = spawn(*args)
    run = out / "cg-s0"
    wait_for_rows(run, 25, proc)
    child = int((run / ".lock").read_text())
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert gone(child), "the benchmark's run outlived it"
    written = steps_of(run)
    assert written == list(range(1, len(written) + 1)) and len(written) < 300
    done = bilevel(*args, "--resume")
    assert done.returncode == 0, done.stderr
    assert steps_of(run) == list(range(1, 301))  # none lost, duplicated or reordered
    assert "| cg | 1 | steps |" in (out / "table.md").read_text()


def test_bench_resume_never_starts_a_second_writer(tmp_path, capsys):
    out = tmp_path / "B"
    args = ["bench", "quadratic", "--methods", "cg", "--seeds", "1", "--steps", "3", "--out",
            out, "--quiet"]  # fmt: skip
    assert cli(capsys, *args)[0] == 0
    before = snapshot(out / "cg-s0")
    with runfolder.exclusive(out / "cg-s0"):  # a run still writing (a live orphan)
        code, err = cli(capsys, *args, "--resume")
    assert code == 2
    one_line(err, "cg-s0 is in use", f"process {os.getpid()}")
    assert snapshot(out / "cg-s0") == before


def test_second_writer_is_refused_and_a_killed_writer_releases_the_folder(tmp_path):
    out = tmp_path / "r"
    args = ["run", *SLOW, "--steps", "200", "--checkpoint-every", "10", "--quiet", "--out", out]
    proc = spawn(*args)
    wait_for_rows(out, 15, proc)
    second = bilevel(*args, "--resume")
    assert second.returncode == 2 and "is in use" in second.stderr
    assert len(second.stderr.strip().splitlines()) == 1
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = bilevel(*args, "--resume")
    assert done.returncode == 0, done.stderr
    assert steps_of(out) == list(range(1, 201))


# ------------------------------------------------------------------ 2. stale runs in a table
def test_bench_into_a_folder_with_other_settings_is_refused(tmp_path, capsys):
    out = tmp_path / "B"
    first = ["bench", "quadratic", "--methods", "cg,itd", "--seeds", "1", "--steps", "4",
             "--out", out, "--quiet"]  # fmt: skip
    assert cli(capsys, *first)[0] == 0
    before = snapshot(out)
    code, err = cli(capsys, "bench", "quadratic", "--methods", "cg", "--seeds", "1", "--steps",
                    "3", "-t", "dim_x=3", "--out", out, "--quiet")  # fmt: skip
    assert code == 2
    one_line(err, "other settings", "steps 4 -> 3", "task_options.dim_x (unset) -> 3")
    assert snapshot(out) == before
    code, err = cli(capsys, *first)  # the same settings again: only with --resume
    assert code == 2
    one_line(err, "already holds this benchmark", "--resume")
    assert snapshot(out) == before
    table = (out / "table.md").read_text()
    assert "| cg | 1 |" in table and "| itd | 1 |" in table


def test_bench_resume_may_extend_its_steps(tmp_path, capsys):
    """A resume may change what RESUME_MAY_CHANGE names (here steps: a finished benchmark is
    extended); bench.yaml then records the new value, the runs keep their rows once, and a
    resume below the steps already done is refused by the run."""
    out = tmp_path / "B"
    base = ["bench", "quadratic", "--methods", "cg", "--seeds", "1", "--out", out, "--quiet"]
    assert cli(capsys, *base, "--steps", "4")[0] == 0
    code, err = cli(capsys, *base, "--steps", "6", "--resume")
    assert code == 0, err
    assert steps_of(out / "cg-s0") == [1, 2, 3, 4, 5, 6]
    assert "steps: 6" in (out / "bench.yaml").read_text()
    code, err = cli(capsys, *base, "--steps", "3", "--resume")
    assert code == 2
    assert any("6 steps are already done" in line for line in err), err
    assert steps_of(out / "cg-s0") == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("seeds", ["0", "-2"])
def test_bench_needs_at_least_one_seed(tmp_path, capsys, seeds):
    code, err = cli(capsys, "bench", "quadratic", "--methods", "cg", "--seeds", seeds, "--out",
                    tmp_path / "B")  # fmt: skip
    assert code == 2
    one_line(err, "seeds must be an integer >= 1")
    assert not (tmp_path / "B").exists()


def test_bench_table_shows_only_its_own_runs(tmp_path, capsys):
    out = tmp_path / "B"
    (out / "old-s0").mkdir(parents=True)
    (out / "old-s0" / "metrics.jsonl").write_text('{"step": 1}\n')
    code, err = cli(capsys, "bench", "quadratic", "--methods", "cg", "--seeds", "1", "--out",
                    out, "--steps", "2")  # fmt: skip
    assert code == 2
    one_line(err, "not empty and holds no bench.yaml")
    assert sorted(p.name for p in out.iterdir()) == ["old-s0"]


# ------------------------------------------------------------------ 3. dead-end folders
def test_run_killed_before_its_first_checkpoint_restarts_from_step_zero(tmp_path):
    out = tmp_path / "r"
    args = ["run", *SLOW, "--steps", "120", "--checkpoint-every", "1000", "--quiet", "--out", out]
    proc = spawn(*args)
    wait_for_rows(out, 5, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "checkpoint.pt").exists() and steps_of(out)
    resumed = bilevel(*args[:-3], "--out", out, "--resume")  # progress on: the note is shown
    assert resumed.returncode == 0, resumed.stderr
    assert "starting from step 0" in resumed.stderr
    assert steps_of(out) == list(range(1, 121))  # no partial row kept twice


def test_folder_without_completed_steps_can_be_rerun(tmp_path, capsys):
    out = tmp_path / "r"
    out.mkdir()
    (out / "config.yaml").write_text("run: {}\n")
    (out / "metrics.jsonl").write_text("")
    code, _ = cli(capsys, "run", "quadratic", "--method", "cg", "--steps", "3", "--quiet",
                  "--out", out)  # fmt: skip
    assert code == 0 and steps_of(out) == [1, 2, 3]


@pytest.mark.parametrize(
    ("args", "config", "message"),
    [
        (["--budget", "-5"], None, "budget must be a positive number"),
        ([], "steps: five\n", "setting steps: expected an integer or none"),
        ([], "checkpoint_every: 0.5\n", "checkpoint_every must be an integer, got 0.5"),
        (["-o", "solver_tol=abc"], None, "method option solver_tol: expected a number"),
        (["-o", "solver_tol=-1"], None, "solver_tol must be a number >= 0"),
        (["-o", "solver_iters=0"], None, "solver_iters must be an integer >= 1"),
        (["-o", "warm_start=no"], None, "method option warm_start: expected True or False"),
        (["-o", "inner_steps=[1"], None, "method option inner_steps: expected an integer"),
        (["-t", "dim_x=[1"], None, "task option dim_x: expected an integer"),
        (["-t", "bogus=[1"], None, "malformed value '[1'"),
        (["--outer-lr", "0"], None, "outer_lr must be a positive number"),
    ],
)
def test_bad_settings_are_refused_before_anything_is_written(tmp_path, capsys, args, config,
                                                               message):  # fmt: skip
    extra = []
    if config is not None:
        (tmp_path / "c.yaml").write_text(config)
        extra = ["--config", tmp_path / "c.yaml"]
    out = tmp_path / "r"
    code, err = cli(capsys, "run", "quadratic", "--method", "cg", *args, *extra, "--out", out)
    assert code == 2
    one_line(err, message)
    assert not out.exists()


# ------------------------------------------------------------------ 4. resume refuses changes
@pytest.fixture
def finished(tmp_path, capsys) -> Path:
    out = tmp_path / "r"
    code, _ = cli(capsys, "run", "quadratic", "--method", "cg", "--steps", "4",
                  "--checkpoint-every", "2", "--quiet", "--out", out)  # fmt: skip
    assert code == 0
    return out


def test_resume_with_changed_settings_is_refused_naming_them(finished, capsys):
    before = snapshot(finished)
    code, err = cli(capsys, "run", "quadratic", "--method", "cg", "--steps", "4", "-o",
                    "inner_steps=2", "--outer-lr", "0.5", "--resume", "--out", finished)
    assert code == 2
    one_line(err, "changed settings", "method_options.inner_steps 20 -> 2",
             "outer_lr 0.05 -> 0.5")  # fmt: skip
    assert snapshot(finished) == before


def test_resume_with_another_method_is_one_clear_line(finished, capsys):
    before = snapshot(finished)
    code, err = cli(capsys, "run", "quadratic", "--method", "itd", "--resume", "--out", finished)
    assert code == 2
    one_line(err, "holds a run of method cg, not itd")
    assert snapshot(finished) == before


def test_resume_may_run_further_and_an_option_at_its_default_is_no_change(finished, capsys):
    code, err = cli(capsys, "run", "quadratic", "--method", "cg", "--steps", "6", "-o",
                    "inner_steps=20", "--resume", "--quiet", "--out", finished)  # fmt: skip
    assert code == 0, err
    assert steps_of(finished) == [1, 2, 3, 4, 5, 6]
    code, err = cli(capsys, "run", "quadratic", "--method", "cg", "--steps", "3", "--resume",
                    "--out", finished)  # fmt: skip
    assert code == 2
    one_line(err, "steps 3: 6 steps are already done")


def test_checkpointed_folder_is_never_resumed_without_resume(finished, capsys, tmp_path):
    before = snapshot(finished)
    code, err = cli(capsys, "run", "quadratic", "--method", "cg", "--out", finished)
    assert code == 2
    one_line(err, "already holds a run with completed steps", "--resume")
    assert snapshot(finished) == before
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / "checkpoint.pt").write_bytes((finished / "checkpoint.pt").read_bytes())
    for extra, message in (([], "already holds a run"), (["--resume"], "no config.yaml")):
        code, err = cli(capsys, "run", "quadratic", "--method", "cg", *extra, "--out", stale)
        assert code == 2
        one_line(err, message)
        assert sorted(p.name for p in stale.iterdir()) == ["checkpoint.pt"]


def test_resume_of_a_folder_without_a_run_is_refused(tmp_path, capsys):
    code, err = cli(capsys, "run", "quadratic", "--method", "cg", "--resume", "--out",
                    tmp_path / "none")  # fmt: skip
    assert code == 2
    one_line(err, "nothing to resume")
    assert not (tmp_path / "none").exists()


# ------------------------------------------------------------------ 5. typed values
def test_values_are_read_by_their_declared_type(tmp_path, capsys):
    out = tmp_path / "r"
    code, err = cli(capsys, "run", "quadratic", "--method", "cg", "--steps", "2", "--quiet",
                    "-o", "inner_lr=1e-3", "-o", "solver_tol=1e-3", "-o", "warm_start=false",
                    "-t", "dtype=float32", "-t", "condition=5", "--out", out)  # fmt: skip
    assert code == 0, err
    record = yaml.safe_load((out / "config.yaml").read_text())
    options = record["resolved"]["method_options"]
    assert options["inner_lr"] == 1e-3 and options["solver_tol"] == 1e-3
    assert options["warm_start"] is False
    assert record["run"]["task_options"] == {"dtype": "float32", "condition": 5.0}
    x = torch.load(out / "checkpoint.pt", weights_only=True)["x"]["x"]
    assert x.dtype == torch.float32


def test_config_file_numbers_are_numbers(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text(
        "task: quadratic\nmethod: cg\nsteps: 2\nouter_lr: 1e-3\nmethod_options: {inner_lr: 1e-1}\n"
    )
    out = tmp_path / "r"
    code, err = cli(capsys, "run", "--config", tmp_path / "c.yaml", "--quiet", "--out", out)
    assert code == 0, err
    record = yaml.safe_load((out / "config.yaml").read_text())
    assert record["resolved"]["solve"]["outer_lr"] == 1e-3
    assert record["resolved"]["method_options"]["inner_lr"] == 0.1


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unavailable_device_is_one_line(tmp_path, capsys):
    code, err = cli(capsys, "run", "quadratic", "--method", "cg", "-t", "device=cuda", "--out",
                    tmp_path / "r")  # fmt: skip
    assert code == 2
    one_line(err, "device='cuda' is not available")
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------ 6. whole messages
def test_missing_dataset_lists_every_path_tried(tmp_path, capsys):
    code, err = cli(capsys, "run", "hyper_cleaning", "--method", "cg", "-t",
                    "data_root=/nonexistent/fmnist", "--out", tmp_path / "r")  # fmt: skip
    assert code == 2 and len(err) == 2
    assert err[0].count("/nonexistent/fmnist/") >= 4 and "dataset-fashion-mnist" in err[1]
    assert not (tmp_path / "r").exists()


def _malicious(path: Path) -> None:
    class Payload:
        def __reduce__(self):
            return (os.system, ("touch " + str(path.parent / "pwned"),))

    torch.save({"step": 2, "x": Payload()}, path)


@pytest.mark.parametrize(
    ("spoil", "message"),
    [
        (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), "truncated"),
        (lambda p: p.write_bytes(b""), "truncated or corrupt"),
        (_malicious, "refused, it holds Python objects"),
    ],
)
def test_bad_checkpoint_is_one_line_and_leaves_the_folder_as_it_was(finished, capsys, spoil,
                                                                    message):  # fmt: skip
    spoil(finished / "checkpoint.pt")
    before = snapshot(finished)
    code, err = cli(capsys, "run", "quadratic", "--method", "cg", "--resume", "--out", finished)
    assert code == 2
    one_line(err, "cannot read checkpoint", message)
    assert snapshot(finished) == before and not (finished / "pwned").exists()


def test_checkpoint_of_another_kind_of_method_is_refused_by_solve(tmp_path):
    task = quadratic(dim_x=2, dim_y=3, seed=0)
    path = tmp_path / "c.pt"
    bl.solve(task.problem, task.x0, task.y0, "cg", steps=2, checkpoint=path)
    with pytest.raises(ValueError, match="written by another kind of method .*ImplicitState"):
        bl.solve(task.problem, task.x0, task.y0, "esj", steps=4, checkpoint=path)


def test_debug_shows_the_traceback(tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        main(["--debug", "run", "quadratic", "--method", "nope", "--out", str(tmp_path / "r")])
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        main(["run", "quadratic", "--method", "nope", "--debug", "--out", str(tmp_path / "r")])


# ------------------------------------------------------------------ 7. divergence
def test_divergent_run_stops_at_its_first_bad_step_and_writes_no_nan(tmp_path, capsys):
    out = tmp_path / "r"
    code, err = cli(capsys, "run", "quadratic", "--method", "cg", "--outer-optimizer", "sgd",
                    "--outer-lr", "1e300", "--steps", "5", "--quiet", "--out", out)  # fmt: skip
    assert code == 2
    one_line(err, "non-finite", "at outer step 0")
    text = (out / "metrics.jsonl").read_text()
    assert text == "" and "NaN" not in text and "Infinity" not in text


@pytest.mark.parametrize("name", ["esj", "esj_s", "hozog"])
def test_es_with_a_divergent_inner_loop_is_an_error(name):
    task = quadratic(dim_x=3, dim_y=5, seed=0)
    method = bl.method(name, inner_lr=1e6, inner_steps=20)
    with pytest.raises(bl.NonFiniteError, match="outer step 0"):
        bl.solve(task.problem, task.x0, task.y0, method, steps=3)


def test_es_watches_every_perturbed_path():
    # only the perturbed paths blow up: the lower loss is finite at x, inf for x beyond 1
    problem = bl.Problem(
        upper=lambda x, y, b: torch.sum(y["y"] ** 2),
        lower=lambda x, y, b: torch.sum((y["y"] - x["x"]) ** 2)
        + torch.where(x["x"].sum() > 1.0, float("inf"), 0.0) * y["y"].sum(),
    )
    x = {"x": torch.full((2,), 0.5, dtype=torch.float64)}
    y = {"y": torch.zeros(2, dtype=torch.float64)}
    method = bl.method("esj", radius=10.0, directions=4, inner_steps=3, batched=False)
    with pytest.raises(bl.NonFiniteError, match="lower_grad"):
        bl.hypergrad(problem, x, y, method)


# ------------------------------------------------------------------ 8. accepted nonsense
@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"solver_tol": -1}, ValueError, "solver_tol must be a number >= 0"),
        ({"solver_tol": "abc"}, TypeError, "solver_tol must be a number"),
        ({"warm_start": "no"}, TypeError, "warm_start must be True or False"),
        ({"solver_iters": 0}, ValueError, "solver_iters must be an integer >= 1"),
        ({"inner_steps": 2.5}, TypeError, "inner_steps must be an integer"),
    ],
)
def test_method_options_are_checked_at_construction(options, error, match):
    with pytest.raises(error, match=match):
        bl.method("cg", **options)


def test_every_method_checks_its_option_types():
    for name in bl.methods_available():
        with pytest.raises(TypeError, match="warm_start must be True or False"):
            bl.method(name, warm_start="no")


def test_projection_must_work_in_place():
    task = quadratic(dim_x=2, dim_y=3, seed=0)
    with pytest.raises(TypeError, match="project must modify x in place"):
        bl.solve(task.problem, task.x0, task.y0, "cg", steps=2,
                 project=lambda x: {k: v.clamp(-1, 1) for k, v in x.items()})  # fmt: skip


def test_callback_must_return_a_dict_or_none():
    task = quadratic(dim_x=2, dim_y=3, seed=0)

    def accuracy(ctx):
        return 0.5

    with pytest.raises(TypeError, match="callback accuracy must return a dict of metrics or None"):
        bl.solve(task.problem, task.x0, task.y0, "cg", steps=2, callbacks=[accuracy])


def test_one_shot_data_is_refused():
    batches = [torch.ones(2, dtype=torch.float64) for _ in range(3)]
    problem = bl.Problem(
        upper=lambda x, y, b: torch.sum((y["y"] - b) ** 2),
        lower=lambda x, y, b: torch.sum((y["y"] - x["x"]) ** 2),
        upper_data=(b for b in batches),
    )
    x, y = {"x": torch.zeros(2, dtype=torch.float64)}, {"y": torch.zeros(2, dtype=torch.float64)}
    with pytest.raises(TypeError, match="upper_data is a one-shot iterator"):
        bl.hypergrad(problem, x, y, "cg")


def test_bench_honours_seed_and_a_task_given_in_the_config_file(tmp_path):
    (tmp_path / "c.yaml").write_text("task: quadratic\nmethods: [cg]\nsteps: 2\n")
    done = bilevel("bench", "--config", tmp_path / "c.yaml", "--seed", "7", "--seeds", "2",
                   "--quiet", cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    out = tmp_path / "runs" / "bench-quadratic"
    assert sorted(p.name for p in out.glob("cg-s*")) == ["cg-s7", "cg-s8"]
    seeds = {yaml.safe_load((out / f / "config.yaml").read_text())["run"]["seed"]
             for f in ("cg-s7", "cg-s8")}  # fmt: skip
    assert seeds == {7, 8}
    assert yaml.safe_load((out / "bench.yaml").read_text())["seed"] == 7


def test_bench_options_for_one_method(tmp_path, capsys):
    out = tmp_path / "B"
    code, err = cli(capsys, "bench", "quadratic", "--methods", "cg,stocbio", "--seeds", "1",
                    "--steps", "2", "-o", "stocbio.solver_iters=7", "-o", "inner_steps=5",
                    "--out", out, "--quiet")  # fmt: skip
    assert code == 0, err
    options = {m: yaml.safe_load((out / f"{m}-s0" / "config.yaml").read_text())["resolved"][
        "method_options"] for m in ("cg", "stocbio")}  # fmt: skip
    assert options["stocbio"]["solver_iters"] == 7 and options["cg"]["solver_iters"] == 20
    assert options["stocbio"]["inner_steps"] == options["cg"]["inner_steps"] == 5
    code, err = cli(capsys, "bench", "quadratic", "--methods", "cg", "-o", "itd.truncate=2",
                    "--out", tmp_path / "C")  # fmt: skip
    assert code == 2
    one_line(err, "method options for itd, which is not benchmarked")


def test_a_run_that_diverges_is_a_benchmark_result_not_its_end(tmp_path, capsys):
    # neumann with a step far above 2/λ_max diverges at its first step; cg runs on after it,
    # the table says which run stopped on NaN/Inf, and a resume does not rerun it
    out = tmp_path / "B"
    args = ["bench", "quadratic", "--methods", "neumann,cg", "--seeds", "1", "--steps", "3",
            "-o", "neumann.solver_lr=1000", "--out", out, "--quiet"]  # fmt: skip
    code, err = cli(capsys, *args)
    assert code == 0, err
    stopped = yaml.safe_load((out / "neumann-s0" / "stopped.yaml").read_text())
    assert stopped["reason"] == "non-finite" and "solver_lr" in stopped["message"]
    assert any("neumann seed 0 stopped on NaN/Inf" in line for line in err)
    table = (out / "table.md").read_text()
    assert "| neumann | 1 | non-finite |" in table and "| cg | 1 | steps |" in table
    before = snapshot(out / "neumann-s0")
    code, err = cli(capsys, *args, "--resume")
    assert code == 0, err
    assert snapshot(out / "neumann-s0") == before


def test_bench_refuses_what_it_would_ignore(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("task: quadratic\nmethod: cg\n")
    code, err = cli(capsys, "bench", "--config", tmp_path / "c.yaml", "--out", tmp_path / "B")
    assert code == 2
    one_line(err, "bench takes methods")
    assert not (tmp_path / "B").exists()


# ------------------------------------------------------------------ 9. the --nproc launcher
def test_launcher_checks_the_split_before_torchrun(tmp_path):
    done = bilevel("run", "sinusoid", "--method", "itd", "--nproc", "2", "--out", tmp_path / "s")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "bilevel: error: a meta-batch of 25 does not split evenly over 2 ranks; choose a "
        "meta-batch size divisible by 2 (task option meta_batch, batch_size, ...)"
    ]
    assert not (tmp_path / "s").exists()


def _processes_writing(folder: Path) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if str(folder).encode() in (entry / "cmdline").read_bytes():
                    stat = (entry / "stat").read_text().split(")")[-1].split()
                    if stat[0] != "Z":
                        found.append(int(entry.name))
            except OSError:
                continue
    return found


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_signalled_launcher_leaves_no_rank_running(tmp_path, sig):
    out = tmp_path / "s"
    proc = spawn("run", "sinusoid", "--method", "itd", "-t", "meta_batch=4", "-o",
                 "inner_steps=5", "--nproc", "2", "--steps", "100000", "--checkpoint-every",
                 "10", "--threads", "1", "--quiet", "--out", out)  # fmt: skip
    wait_for_rows(out, 3, proc, limit=240)
    assert len(_processes_writing(out)) >= 3  # launcher, torchrun, ranks
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    if sig != signal.SIGKILL:
        assert proc.returncode == 128 + sig
        assert "interrupted: every process of the run has stopped" in err
        assert _processes_writing(out) == []  # nothing left once "interrupted" is said
    deadline = time.time() + 30
    while _processes_writing(out) and time.time() < deadline:
        time.sleep(0.1)
    assert _processes_writing(out) == []
    rows = steps_of(out)
    time.sleep(0.5)
    assert steps_of(out) == rows == list(range(1, len(rows) + 1))


# ------------------------------------------------------------------ 10. progress and headers
def test_budget_progress_counts_seconds(tmp_path):
    done = bilevel("run", "quadratic", "--method", "cg", "--budget", "0.2", "--out",
                   tmp_path / "r")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "/0.2 s" in done.stderr and "1000000000" not in done.stderr


def test_table_headline_says_what_stopped_the_runs(tmp_path, capsys):
    out = tmp_path / "B"
    code, _ = cli(capsys, "bench", "quadratic", "--methods", "cg", "--seeds", "1", "--steps",
                  "3", "--budget", "60", "--out", out, "--quiet")  # fmt: skip
    assert code == 0
    table = (out / "table.md").read_text()
    assert table.startswith("Final values after all steps (within the budget of 60 s)")
    assert "at the budget" not in table and "| cg | 1 | steps | 3 [3, 3] |" in table
