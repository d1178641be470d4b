"""The command line, run as a user would (subprocesses): outputs, errors, kill and resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bilevel.methods.implicit import POWER_ITERS

BILEVEL = [sys.executable, "-m", "bilevel.cli"]
RUN = ["run", "quadratic", "--method", "cg", "-o", "inner_steps=100", "-o", "inner_lr=1.0",
       "--checkpoint-every", "5", "--quiet"]  # fmt: skip


def bilevel(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([*BILEVEL, *args], capture_output=True, text=True, timeout=600)
    if check and done.returncode != 0:
        raise AssertionError(done.stderr)
    return done


def test_list_names_tasks_and_methods():
    out = bilevel("list").stdout
    assert "quadratic" in out and "cg" in out and "itd" in out


def test_run_writes_config_metrics_and_checkpoint(tmp_path):
    bilevel(*RUN, "--steps", "6", "--out", str(tmp_path / "r"))
    rows = _rows(tmp_path / "r")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert {"step", "seconds", "oracles", "peak_memory_mb", "upper_loss",
            "hypergrad_error"} <= set(rows[-1])  # fmt: skip
    assert rows[-1]["oracles"]["lower_grad"] == 600
    config = (tmp_path / "r" / "config.yaml").read_text()
    assert "inner_steps: 100" in config and "threads:" in config
    assert (tmp_path / "r" / "checkpoint.pt").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "nope", "--method", "cg"], "unknown task 'nope'"),
        (["run", "quadratic", "--method", "nope"], "unknown method 'nope'"),
        (["run", "quadratic", "--method", "cg", "-o", "bogus=1"], "no option(s) bogus"),
        (["run", "quadratic", "--method", "cg", "-t", "bogus=1"], "no option(s) bogus"),
        (["bench", "quadratic", "--methods", "cg,nope"], "unknown method 'nope'"),
        (
            ["run", "hyper_cleaning", "--method", "cg", "-t", "data_root=/nonexistent/fmnist"],
            "dataset-fashion-mnist",
        ),
    ],
)
def test_bad_input_is_one_clear_line(tmp_path, args, message):
    done = bilevel(*args, "--out", str(tmp_path / "o"), check=False)
    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    if "data_root=/nonexistent/fmnist" in args:  # one line per cause: the paths tried, the fix
        assert len(lines) == 2 and "tried: /nonexistent/fmnist/" in lines[0]
    else:
        assert len(lines) == 1


def test_malformed_config_and_unwritable_output(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [1, 2\n")
    done = bilevel("run", "quadratic", "--method", "cg", "--config", str(bad), check=False)
    assert done.returncode == 2 and "malformed config" in done.stderr
    bad.write_text("- just\n- a list\n")
    done = bilevel("run", "quadratic", "--method", "cg", "--config", str(bad), check=False)
    assert done.returncode == 2 and "malformed config" in done.stderr
    blocker = tmp_path / "file"
    blocker.write_text("")
    done = bilevel(*RUN, "--steps", "2", "--out", str(blocker / "sub"), check=False)
    assert done.returncode == 2 and "cannot write to output folder" in done.stderr
    assert "Traceback" not in done.stderr


def test_config_file_settings_and_flag_override(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "task: quadratic\nmethod: neumann\nsteps: 3\nmethod_options: {solver_iters: 4}\n"
    )
    bilevel("run", "--config", str(cfg), "--steps", "2", "--out", str(tmp_path / "r"), "--quiet")
    rows = (tmp_path / "r" / "metrics.jsonl").read_text().split("\n")
    # solver_iters=4 Hessian-vector products per step, 2 steps, + the step-size check
    second = json.loads(rows[1])
    assert second["step"] == 2 and second["oracles"]["hvp"] == 8 + POWER_ITERS


def _rows(folder: Path) -> list[dict]:
    path = folder / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def test_killed_run_resumes_without_losing_rows_and_ends_bit_exact(tmp_path):
    steps = ["--steps", "80"]
    bilevel(*RUN, *steps, "--out", str(tmp_path / "full"))
    killed = tmp_path / "killed"
    proc = subprocess.Popen([*BILEVEL, *RUN, *steps, "--out", str(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 120
    while len(_rows(killed)) < 23 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 23 <= len(_rows(killed)) < 80
    bilevel(*RUN, *steps, "--out", str(killed), "--resume")
    full, resumed = _rows(tmp_path / "full"), _rows(killed)
    assert [r["step"] for r in resumed] == list(range(1, 81))

    def strip(rows):
        measured = ("seconds", "cpu_seconds", "peak_memory_mb")
        return [{k: v for k, v in r.items() if k not in measured} for r in rows]

    assert strip(resumed) == strip(full)
    x_full = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)["x"]
    x_resumed = torch.load(killed / "checkpoint.pt", weights_only=True)["x"]
    assert torch.equal(x_full["x"], x_resumed["x"])


def test_bench_writes_table_and_plots(tmp_path):
    out = tmp_path / "b"
    done = bilevel("bench", "quadratic", "--methods", "cg,itd", "--budget", "0.5",
                   "--seeds", "2", "--log-every", "2", "--out", str(out))  # fmt: skip
    table = (out / "table.md").read_text()
    assert "| cg | 2 |" in table and "| itd | 2 |" in table and "hypergrad_error" in table
    assert (out / "hypergrad_error.png").stat().st_size > 5000
    assert "table:" in done.stdout and "plot:" in done.stdout
    assert len(list(out.glob("*-s*/metrics.jsonl"))) == 4


def test_bench_quick_preset_runs_with_overrides(tmp_path):
    out = tmp_path / "q"
    bilevel("bench", "quick", "--budget", "0.3", "--seeds", "1", "--methods", "cg", "--out",
            str(out))  # fmt: skip
    table = (out / "table.md").read_text()
    assert "| cg | 1 |" in table and "test_accuracy" in table and "reference: oracle" in table
