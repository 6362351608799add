"""Metrics as TensorBoard scalars, written with TensorBoard's own event writer, so that
`%tensorboard --logdir DIR` shows them beside a user's other runs, and runs can be compared
over days. Needs the `tensorboard` package (the `[tensorboard]` extra); neither torch nor
TensorFlow is imported.

Each cell is a run of its own, `DIR/<cell>`, because every cell counts its steps from zero:
inside it, `rank<k>` holds what that rank reported (every numeric field, at its `step`) and its
load samples (`load/...`), and `pool` holds pool-wide figures per step: samples per second over
all ranks, the share of time the ranks spent communicating, and mean CPU load.
"""

from __future__ import annotations

import math
import os
import sys
import time
import types
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from nbdist._errors import ConfigError

NOT_SCALARS = frozenset({"cell", "rank", "kind", "t", "step", "total"})


def _without_tensorflow() -> None:
    """TensorBoard's writer reaches files through `tensorboard.compat.tf`, which imports all of
    TensorFlow (seconds, hundreds of MB, and its C++ noise) when it is installed. The kernel
    never needs it: TensorBoard's own switch to its stub (a module named `notf`) is set, unless
    the notebook has imported TensorFlow itself."""
    if "tensorflow" not in sys.modules:
        sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))


def _writer(folder: str) -> Any:
    _without_tensorflow()
    try:
        from tensorboard.summary.writer.event_file_writer import EventFileWriter
    except ImportError:
        raise ConfigError("writing TensorBoard events needs the tensorboard package: "
                          "pip install 'nbdist[tensorboard]' (or pip install tensorboard)") from None
    return EventFileWriter(folder, max_queue_size=1 << 20)


class _Run:
    """One run folder's event file. Every value of one step goes in one event: TensorBoard's
    writer checksums each record in pure Python, so fewer, fuller records cost far less."""

    def __init__(self, folder: str) -> None:
        self.writer = _writer(folder)

    def scalars(self, values: Mapping[str, float], step: int, wall_time: float) -> None:
        if not values:
            return
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary

        summary = Summary(value=[Summary.Value(tag=tag, simple_value=value) for tag, value in values.items()])
        self.writer.add_event(Event(wall_time=wall_time, step=int(step), summary=summary))

    def close(self) -> None:
        self.writer.close()


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        return None  # NaN: a field this row did not report (a DataFrame's empty cell)
    return float(value)


def _scalars(row: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    numbers = {f"{prefix}{key}": _number(value) for key, value in row.items() if key not in NOT_SCALARS}
    return {key: number for key, number in numbers.items() if number is not None}


def write_cell(rows: Iterable[Mapping[str, Any]], logdir: str, run: str) -> str:
    """Write one cell's records under `logdir/run`; return that folder."""
    folder = os.path.join(logdir, run)
    runs: dict[str, _Run] = {}

    def to(name: str) -> _Run:
        if name not in runs:
            runs[name] = _Run(os.path.join(folder, name))
        return runs[name]

    by_step: dict[int, list[Mapping[str, Any]]] = defaultdict(list)
    loads: dict[int, list[Mapping[str, Any]]] = defaultdict(list)
    seen: dict[int, int] = defaultdict(int)
    try:
        for row in rows:
            rank, t = int(row["rank"]), float(row.get("t") or 0.0)
            if row.get("kind") == "load":
                index = len(loads[rank])
                loads[rank].append(row)
                to(f"rank{rank}").scalars(_scalars(row, "load/"), index, t)
                continue
            reported = _number(row.get("step"))
            step = int(reported) if reported is not None else seen[rank]
            seen[rank] += 1
            by_step[step].append(row)
            to(f"rank{rank}").scalars(_scalars(row), step, t)
        _pool_figures(by_step, loads, to)
    finally:
        for written in runs.values():
            written.close()
    return folder


def _pool_figures(by_step: Mapping[int, list[Mapping[str, Any]]], loads: Mapping[int, list[Mapping[str, Any]]],
                  to: Any) -> None:
    """Samples per second and communication share between consecutive steps every rank
    reported; mean CPU load over the ranks' load samples taken at the same index."""
    ranks = {int(row["rank"]) for rows in by_step.values() for row in rows}
    previous: float | None = None
    for step in sorted(by_step):
        rows = by_step[step]
        if {int(row["rank"]) for row in rows} != ranks:
            continue
        done = max(float(row.get("t") or 0.0) for row in rows)
        if previous is not None and done > previous:
            span, figures = done - previous, {}
            samples = [_number(row.get("samples")) for row in rows]
            if all(s is not None for s in samples):
                figures["throughput/samples_per_s"] = sum(s for s in samples if s is not None) / span
            comm = [_number(row.get("comm_s")) for row in rows]
            if all(c is not None for c in comm):
                figures["comm/share"] = min(sum(c for c in comm if c is not None) / (span * len(rows)), 1.0)
            if figures:
                to("pool").scalars(figures, step, done)
        previous = done
    if loads:
        for index in range(min(len(samples) for samples in loads.values())):
            cpus = [_number(rows[index].get("cpu")) for rows in loads.values()]
            if all(c is not None for c in cpus):
                t = max(float(rows[index].get("t") or 0.0) for rows in loads.values())
                to("pool").scalars({"load/cpu_mean": sum(c for c in cpus if c is not None) / len(cpus)}, index, t)


def write_history(rows: Iterable[Mapping[str, Any]], logdir: str) -> list[str]:
    """Write every cell of a history, each as its own run; return the run folders."""
    cells: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        cells.setdefault(str(row.get("cell") or "cell"), []).append(row)
    return [write_cell(cell_rows, logdir, run_name(cell_rows)) for cell_rows in cells.values()]


def run_name(rows: Sequence[Mapping[str, Any]]) -> str:
    """`<date>-<time>-cell<N>`: when the cell began and its number, so runs from different
    days (whose cells are numbered from 1 again) never share a folder and sort in time."""
    started = min((float(row["t"]) for row in rows if _number(row.get("t")) is not None), default=time.time())
    return f"{time.strftime('%Y%m%d-%H%M%S', time.localtime(started))}-cell{rows[0].get('cell') or 0}"
