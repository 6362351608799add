"""The kernel's side of metrics: numbered batches in, per-rank series out. No widgets here."""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from nbdist._wire import METRICS_KEY_PREFIX

TRAIN_FIELDS = ("t", "step", "loss", "samples", "comm_s")
LOAD_FIELDS = ("t", "cpu", "rss_mb", "gpu_util", "gpu_mem_mb", "param_mb", "grad_mb", "optim_mb")


@dataclass
class Series:
    """Column lists, appended as records arrive (cheap to plot with set_data)."""

    columns: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))

    def add(self, record: Mapping[str, Any], names: tuple[str, ...]) -> None:
        for name in names:
            value = record.get(name)
            self.columns[name].append(float("nan") if value is None else float(value))

    def __len__(self) -> int:
        return len(self.columns.get("t", ()))


class MetricStore:
    """Every record of one cell, in order and exactly once per rank."""

    def __init__(self, cell: str = "") -> None:
        self.cell = cell
        self.records: list[dict[str, Any]] = []
        self.train: dict[int, Series] = defaultdict(Series)
        self.load: dict[int, Series] = defaultdict(Series)
        self.total: int | None = None
        self._next: dict[int, int] = defaultdict(int)
        self.restarts: list[float] = []
        """When the cell was run again on fresh engines (`--retries`), as wall-clock times."""

    def ingest(self, rank: int, data: Mapping[str, Any]) -> int:
        """Take the batches from `data` (an engine's published data) not seen yet."""
        taken = 0
        seq = self._next[rank]
        while (batch := data.get(f"{METRICS_KEY_PREFIX}{seq}")) is not None:
            for record in batch:
                self._add(rank, record)
                taken += 1
            seq += 1
        self._next[rank] = seq
        return taken

    def _add(self, rank: int, record: Mapping[str, Any]) -> None:
        row = {"cell": self.cell, "rank": rank, "kind": "train", **record}
        self.records.append(row)
        if row["kind"] == "load":
            self.load[rank].add(row, LOAD_FIELDS)
        else:
            self.train[rank].add(row, TRAIN_FIELDS)
            if "total" in row and row["total"] is not None:
                self.total = int(row["total"])

    def restart(self, when: float) -> None:
        """The cell runs again on fresh engines, whose report batches are numbered from 0 again:
        the records so far stay, so the plot goes on from where the failure left it."""
        self._next.clear()
        self.restarts.append(when)

    # -- summaries the dashboard draws ------------------------------------------------------

    def latest_step(self) -> float | None:
        steps = [s.columns["step"][-1] for s in self.train.values() if len(s)]
        return min(steps) if steps else None

    def throughput(self, window: float = 2.0, until: float | None = None) -> tuple[float, float]:
        """(global samples/s, steps/s) over the `window` seconds of reports before `until`
        (a wall-clock time; the latest report by default)."""
        samples = 0.0
        steps_per_s = 0.0
        for series in self.train.values():
            t = series.columns["t"]
            last = len(t) - 1 if until is None else bisect.bisect_right(t, until) - 1
            if last < 1:
                continue
            end = t[last]
            first = bisect.bisect_left(t, end - window, 0, last)  # reports arrive in time order per rank
            if first >= last:
                first = last - 1
            span = end - t[first]
            if span <= 0:
                continue
            samples += sum(v for v in series.columns["samples"][first + 1:last + 1] if v == v) / span
            steps = series.columns["step"]
            steps_per_s = max(steps_per_s, (steps[last] - steps[first]) / span)
        return samples, steps_per_s

    def report_times(self, limit: int) -> list[float]:
        """Up to `limit` evenly spaced times from the second report (the first rate) to the last."""
        ends = [s.columns["t"] for s in self.train.values() if len(s) >= 2]
        if not ends:
            return []
        start, end = min(t[1] for t in ends), max(t[-1] for t in ends)
        count = max(2, min(limit, sum(len(t) for t in ends)))
        return [start + (end - start) * i / (count - 1) for i in range(count)]

    def comm_fraction(self, rank: int) -> float | None:
        """Share of step time spent in gradient allreduce (None when not measured)."""
        series = self.train.get(rank)
        if series is None or len(series) < 2:
            return None
        comm = [c for c in series.columns["comm_s"][1:] if c == c]
        if not comm:
            return None
        elapsed = series.columns["t"][-1] - series.columns["t"][0]
        return min(1.0, sum(comm) / elapsed) if elapsed > 0 else None
