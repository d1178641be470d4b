"""Batch streams: the lower, upper and task batches a problem's oracles are called with.

Each stream cycles its iterable forever (restarting an exhausted one rather than keeping every
batch alive as ``itertools.cycle`` would) and counts the batches drawn, so a resumed run can
replay them (:meth:`BatchStreams.skip_batches`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any


class BatchStreams:
    """The batch side of a :class:`bilevel.Problem` (a base class of it).

    ``lower_data`` / ``upper_data``: iterables of batches, ``None`` for full-batch losses;
    ``task_data``: one task batch per outer step (:meth:`next_task`), passed to both losses for
    that step unless lower_data / upper_data are given.
    """

    lower_data: Iterable | None
    upper_data: Iterable | None
    task_data: Iterable | None

    def _init_streams(
        self,
        lower_data: Iterable | None,
        upper_data: Iterable | None,
        task_data: Iterable | None,
    ) -> None:
        self.lower_data, self.upper_data, self.task_data = lower_data, upper_data, task_data
        self.current_task: Any = None
        self._streams: dict[str, Iterator | None] = {}
        self.batches_drawn: Counter[str] = Counter()

    def lower_batch(self) -> Any:
        """Next lower-level batch (the current task batch, or ``None``, without lower_data)."""
        if self.lower_data is None:
            return self.current_task
        return self._next("lower", self.lower_data)

    def upper_batch(self) -> Any:
        """Next upper-level batch (the current task batch, or ``None``, without upper_data)."""
        if self.upper_data is None:
            return self.current_task
        return self._next("upper", self.upper_data)

    def next_task(self) -> None:
        """Start an outer step: draw its task batch (with task_data) and forget the cached
        representations of the last step's point."""
        self._new_point()
        if self.task_data is not None:
            self.current_task = self._next("task", self.task_data)

    def skip_batches(self, drawn: dict[str, int]) -> None:
        """Replay ``drawn`` batches of each stream (to resume from a checkpoint): the streams
        must be deterministic, e.g. seeded samplers or fixed lists."""
        for which, count in drawn.items():
            data = self._data(which)
            for _ in range(count if data is not None else 0):
                self._next(which, data)

    def _new_point(self) -> None:
        """Hook for the oracles' per-step caches (see :class:`bilevel.oracles.Oracles`)."""

    def _data(self, which: str) -> Iterable | None:
        return {"lower": self.lower_data, "upper": self.upper_data, "task": self.task_data}[which]

    def _next(self, which: str, data: Iterable) -> Any:
        stream = self._streams.get(which)
        if stream is None:
            stream = self._streams[which] = iter(data)
        try:
            batch = next(stream)
        except StopIteration:
            stream = self._streams[which] = iter(data)
            try:
                batch = next(stream)
            except StopIteration:
                raise ValueError(f"the problem's {which}_data is empty") from None
        self.batches_drawn[which] += 1
        return batch
