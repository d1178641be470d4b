"""One writer per results folder, and child processes that die with their parent.

A process that writes into a run or benchmark folder holds an exclusive ``flock`` on the
folder's ``.lock`` file for as long as it writes. The kernel drops the lock when the holder
exits, however it exits (``kill -9`` included), so a dead holder never blocks the folder: the
next writer takes the lock at once. The file keeps the holder's pid, for the message a second
writer gets.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

LOCK = ".lock"
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


class FolderInUseError(RuntimeError):
    """Another live process writes into the folder."""


@contextlib.contextmanager
def exclusive(folder: Path) -> Iterator[None]:
    """Hold the folder's write lock inside the block; raise :class:`FolderInUseError` at once
    if a live process holds it. The folder must exist."""
    fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FolderInUseError(_in_use(folder, fd)) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)  # releases the lock


def check_free(folder: Path) -> None:
    """Raise :class:`FolderInUseError` if a live process writes into ``folder`` now."""
    path = folder / LOCK
    if not path.exists():
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FolderInUseError(_in_use(folder, fd)) from None
    finally:
        os.close(fd)


def _in_use(folder: Path, fd: int) -> str:
    try:
        holder = os.pread(fd, 32, 0).decode().strip() or "another process"
    except OSError:
        holder = "another process"
    who = f"process {holder}" if holder.isdigit() else holder
    return (
        f"{folder} is in use: {who} is writing there (one writer per folder); wait for it to "
        "finish or stop it, then run again"
    )


def die_with_parent(sig: int = signal.SIGKILL) -> Callable[[], None] | None:
    """A ``preexec_fn`` for :mod:`subprocess` that has Linux send ``sig`` to the child when
    this process dies (``prctl(PR_SET_PDEATHSIG)``), so no child outlives a killed parent.
    ``None`` off Linux (there, children are stopped only when the parent exits cleanly)."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def arm() -> None:
        prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the signal was armed
            os.kill(os.getpid(), sig)

    return arm
