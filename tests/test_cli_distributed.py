"""`bilevel run --nproc 2` (torchrun, gloo): a rank killed mid-run, then --resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

BILEVEL = [sys.executable, "-m", "bilevel.cli"]
STEPS = 300
RUN = ["run", "sinusoid", "--method", "itd", "-t", "meta_batch=4", "-o", "inner_steps=5",
       "--steps", str(STEPS), "--checkpoint-every", "10", "--threads", "1", "--quiet"]  # fmt: skip


def rows(folder: Path) -> list[dict]:
    path = folder / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def rank_pid(rank: int, folder: Path) -> int | None:
    """The pid of the torchrun worker with RANK=rank that writes into ``folder``."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if str(folder).encode() in cmdline and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    return None


def test_killed_rank_fails_clearly_and_resume_matches_uninterrupted(tmp_path):
    full = tmp_path / "full"
    done = subprocess.run([*BILEVEL, *RUN, "--nproc", "2", "--out", str(full)],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr

    killed = tmp_path / "killed"
    command = [*BILEVEL, *RUN, "--nproc", "2", "--out", str(killed)]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while len(rows(killed)) < 40 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    pid = rank_pid(1, killed)
    assert proc.poll() is None and pid is not None, "the run finished before it could be killed"
    os.kill(pid, signal.SIGKILL)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1
    assert "a rank of the 2-process run failed" in err and "--resume" in err
    assert 40 <= len(rows(killed)) < STEPS

    done = subprocess.run([*BILEVEL, *RUN, "--nproc", "2", "--out", str(killed), "--resume"],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert [r["step"] for r in rows(killed)] == list(range(1, STEPS + 1))
    x_full = torch.load(full / "checkpoint.pt", weights_only=True)["x"]
    x_resumed = torch.load(killed / "checkpoint.pt", weights_only=True)["x"]
    for key in x_full:
        assert torch.equal(x_full[key], x_resumed[key]), key
