"""`nbdist.report()` on engines: append to a buffer on the hot path, publish in numbered batches.

ipyparallel's `publish_data` keeps only the latest value per key, so each batch gets a
key of its own (`nbdist:<seq>`); the kernel consumes keys in order, exactly once.
Outside a `%%distributed` cell there is no active reporter and `report()` does nothing.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from nbdist._wire import METRICS_KEY_PREFIX

FLUSH_SECONDS = 0.25


class Reporter:
    def __init__(
        self,
        publish: Callable[[dict[str, Any]], None],
        *,
        interval: float = FLUSH_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._publish = publish
        self._interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        self._buffer: list[dict[str, Any]] = []
        self._timers: dict[str, float] = {}
        self._seq = 0
        self._next_flush = clock() + interval

    def report(self, values: dict[str, Any]) -> None:
        record = dict(values)
        record["t"] = time.time()
        with self._lock:
            if self._timers and "kind" not in record:
                record.update(self._timers)
                self._timers = {}
            self._buffer.append(record)
        if self._clock() >= self._next_flush:
            self.flush()

    def add_time(self, name: str, seconds: float) -> None:
        """Accumulate a duration (e.g. allreduce time) into the next reported record."""
        with self._lock:
            self._timers[name] = self._timers.get(name, 0.0) + seconds

    def flush(self) -> None:
        with self._lock:
            batch, self._buffer = self._buffer, []
            self._next_flush = self._clock() + self._interval
            if not batch:
                return
            seq, self._seq = self._seq, self._seq + 1
            # Published under the lock so batches leave in sequence order.
            self._publish({f"{METRICS_KEY_PREFIX}{seq}": batch})


class _Active:
    """The reporter of the cell now running on this engine (None between cells), and what must
    run on the training thread when it reports (between two steps, where tensors are at rest)."""

    reporter: Reporter | None = None
    between_steps: Callable[[], None] | None = None


def activate(reporter: Reporter | None, between_steps: Callable[[], None] | None = None) -> None:
    _Active.reporter = reporter
    _Active.between_steps = between_steps


def active() -> Reporter | None:
    return _Active.reporter


def report(**values: Any) -> None:
    """Record metrics for the dashboard: `report(step=i, loss=l, samples=n, total=N, ...)`.

    Cheap enough for every step; a no-op outside a `%%distributed` cell."""
    reporter = _Active.reporter
    if reporter is not None:
        reporter.report(values)
        if _Active.between_steps is not None:
            _Active.between_steps()


def add_time(name: str, seconds: float) -> None:
    reporter = _Active.reporter
    if reporter is not None:
        reporter.add_time(name, seconds)
