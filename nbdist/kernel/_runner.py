"""Running one cell on every rank: streaming its output, feeding observers, and ending it
within seconds when a rank fails, an engine dies, or the user interrupts it."""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any, Protocol

from nbdist._errors import DistributedCellError
from nbdist._say import say
from nbdist._wire import CellOutcome, remote_traceback
from nbdist.cluster import EngineExit
from nbdist.engine import _cell as engine_cell
from nbdist.kernel._contain import LOST_STATE, Ranks, settle
from nbdist.kernel._history import History
from nbdist.kernel._output import OutputStream
from nbdist.kernel._store import MetricStore

POLL_SECONDS = 0.1
ENGINE_DIED = "EngineError"  # what ipyparallel fails a task with when its engine dies
DEATH_SETTLE_SECONDS = 3.0  # how long the controller's word of that death may trail the failure
KEPT = "Engine state is kept: the pool is ready for the next cell."


class CellObserver(Protocol):
    """Something that watches a running cell (the dashboard). Called from the poll loop."""

    def cell_started(self, store: MetricStore) -> None: ...

    def cell_polled(self) -> None: ...

    def cell_finished(self, ok: bool) -> None: ...


@dataclass
class CellResult:
    value: Any
    outcomes: list[CellOutcome]
    seconds: float
    display: dict[str, Any] | None = field(default=None)


def heal(ranks: Ranks) -> None:
    """Replace engines that died between cells before anything runs on them, and say so."""
    exits = ranks.exits()
    if exits:
        seconds = ranks.recover()
        say(f"{'; '.join(x.describe() for x in exits)} since the last cell. {LOST_STATE} "
            f"(recovered in {seconds:.1f} s)", unasked=True)


def _outcome(ar: Any, rank: int) -> CellOutcome:
    """A finished rank's outcome; an ipyparallel-level error becomes a failed outcome."""
    try:
        result = ar.result()
    except Exception as exc:  # noqa: BLE001 - e.g. the engine could not send its result
        ename = getattr(exc, "ename", None) or type(exc).__name__  # a RemoteError names what it wraps
        return CellOutcome(rank=rank, ok=False, ename=ename, evalue=str(exc), traceback=remote_traceback(exc))
    assert isinstance(result, CellOutcome)
    return result


def _await_exits(ranks: Ranks, seconds: float) -> list[EngineExit]:
    deadline = time.monotonic() + seconds
    exits = ranks.exits()
    while not exits and time.monotonic() < deadline:
        time.sleep(0.05)
        exits = ranks.exits()
    return exits


def _ranks_were(ranks: list[int]) -> str:
    listed = ", ".join(map(str, ranks))
    return f"Rank {listed} was" if len(ranks) == 1 else f"Ranks {listed} were"


def _failure(failed: list[CellOutcome]) -> tuple[str, dict[int, str]]:
    """The first failing rank's error for the summary; each distinct traceback once."""
    failed = sorted(failed, key=lambda o: o.rank)
    shown: dict[int, str] = {}
    for o in failed:
        if o.traceback not in shown.values():
            shown[o.rank] = o.traceback
    first = failed[0]
    ranks = ", ".join(str(o.rank) for o in failed)
    where = f"rank {ranks}" if len(failed) == 1 else f"ranks {ranks}"
    return f"{first.ename} on {where}: {first.evalue}", shown


class CellRunner:
    def __init__(self, ranks: Ranks, *, output: str = "rank0", observers: Sequence[CellObserver] = (),
                 history: History | None = None) -> None:
        self.ranks = ranks
        self.output = output
        self.observers = list(observers)
        self.history = history
        self.store = MetricStore()
        self._pending: list[Any] = []

    def run(self, source: str, *, cell_id: str, backend: str, strategy: str, timeout: float | None,
            line_offset: int = 0) -> CellResult:
        started = time.monotonic()
        pending = [
            view.apply_async(engine_cell.run_cell, source, cell_id, backend, strategy, rank == 0, line_offset)
            for rank, view in enumerate(self.ranks.views)
        ]
        stream = OutputStream(pending, self.output)
        self.store = MetricStore(cell=cell_id)
        self._pending = pending
        for obs in self.observers:
            obs.cell_started(self.store)
        ok = False
        try:
            outcomes = self._watch(pending, stream, started, timeout)
            ok = True
        finally:
            self._collect()
            if self.history is not None:
                self.history.extend(self.store.records)
            for obs in self.observers:
                obs.cell_finished(ok)
        rank0 = outcomes[0]
        return CellResult(rank0.value, outcomes, time.monotonic() - started, rank0.display)

    def _watch(self, pending: list[Any], stream: OutputStream, started: float,
               timeout: float | None) -> list[CellOutcome]:
        ranks = self.ranks
        first_failure: float | None = None
        try:
            while True:
                waiting = [ar for ar in pending if not ar.done()]
                if waiting:
                    futures.wait(waiting, timeout=POLL_SECONDS, return_when=futures.FIRST_COMPLETED)
                stream.pump()
                self._collect()
                for obs in self.observers:
                    obs.cell_polled()
                done = {rank: _outcome(ar, rank) for rank, ar in enumerate(pending) if ar.done()}
                # Checked before "all done": ipyparallel may fail a dead engine's task at once,
                # and the cell must still be reported as an engine death, with recovery.
                exits = ranks.exits()
                if exits:
                    stream.pump(final=True)
                    raise self._engine_died(exits, done)
                if len(done) == len(pending):
                    break
                now = time.monotonic()
                failed = [o for o in done.values() if not o.ok]
                if failed and first_failure is None:
                    first_failure = now
                if first_failure is not None and now - first_failure > ranks.grace:
                    stream.pump(final=True)
                    stuck = [r for r, ar in enumerate(pending) if not ar.done()]
                    summary, tracebacks = _failure(failed)
                    raise settle(ranks, f"{summary}\n{_ranks_were(stuck)} still waiting (most likely in a "
                                 f"collective for the failed rank) and {'was' if len(stuck) == 1 else 'were'} "
                                 "stopped.", tracebacks, stuck=stuck)
                if timeout is not None and now - started > timeout:
                    raise self._stop(pending, stream, f"The cell timed out after {timeout:g} s.")
        except KeyboardInterrupt:
            raise self._stop(pending, stream, "The cell was interrupted.") from None
        for ar in pending:
            ar.wait_for_output(timeout=1.0)
        stream.pump(final=True)
        outcomes = [_outcome(ar, rank) for rank, ar in enumerate(pending)]
        failed = [o for o in outcomes if not o.ok]
        if any(o.ename == ENGINE_DIED for o in failed):
            # ipyparallel failed a task because its engine died; the controller's word of it
            # (and the exit status) can trail the failed result by a moment.
            exits = _await_exits(ranks, DEATH_SETTLE_SECONDS)
            if exits:
                raise self._engine_died(exits, {o.rank: o for o in outcomes})
        if failed:
            summary, tracebacks = _failure(failed)
            raise settle(ranks, f"{summary}\n", tracebacks, kept=KEPT)
        return outcomes

    def _collect(self) -> None:
        for rank, ar in enumerate(self._pending):
            self.store.ingest(rank, ar.metadata.get("data") or {})

    def _engine_died(self, exits: list[EngineExit], done: dict[int, CellOutcome]) -> DistributedCellError:
        tracebacks = {o.rank: o.traceback for o in done.values() if not o.ok}
        return settle(self.ranks, f"EngineDied: {'; '.join(x.describe() for x in exits)}.\n", tracebacks,
                      exits=exits)

    def _stop(self, pending: list[Any], stream: OutputStream, reason: str) -> DistributedCellError:
        """Interrupt every rank still running; if any cannot stop (a gloo collective ignores
        SIGINT), free it by restarting the pool."""
        ranks = self.ranks
        running = [rank for rank, ar in enumerate(pending) if not ar.done()]
        ranks.interrupt(running)
        futures.wait([pending[r] for r in running], timeout=ranks.grace)
        stream.pump(final=True)
        still = [r for r in running if not pending[r].done()]
        tracebacks = {}
        for rank, ar in enumerate(pending):
            if ar.done():
                outcome = _outcome(ar, rank)
                if not outcome.ok and not outcome.interrupted:
                    tracebacks[rank] = outcome.traceback
        exits = ranks.exits()
        if still:
            reason += f" Ranks {', '.join(map(str, still))} did not stop (blocked in a collective) and were killed."
        return settle(ranks, reason, tracebacks, stuck=still, exits=exits,
                      kept="Every rank stopped; engine state is kept and the pool is ready.")
