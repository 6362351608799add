"""Running one cell on every rank: streaming its output, and containing its failures.

The rule: the notebook never hangs. A rank that raises while others wait in a
collective, an engine that dies, a timeout or an interrupt all end the cell within
seconds with a message that says what happened and what state was lost.
"""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Sequence
from concurrent import futures
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from nbdist import engine as engine_side
from nbdist.backends import Formation
from nbdist.engine import CellOutcome
from nbdist.errors import DistributedCellError
from nbdist.store import MetricStore

if TYPE_CHECKING:
    from nbdist.pool import EngineExit, Pool

POLL_SECONDS = 0.1
ENGINE_DIED = "EngineError"  # what ipyparallel fails a task with when its engine dies
DEATH_SETTLE_SECONDS = 3.0  # how long the controller's word of that death may trail the failure
LOST_STATE = (
    "The pool was restarted with fresh engines: every variable on the engines is lost "
    "(re-run the cells that define them, or restore a checkpoint)."
)


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


class OutputStream:
    """Copies engines' stdout/stderr to the notebook as it arrives."""

    def __init__(self, pending: Sequence[Any], output: str) -> None:
        self._pending = pending
        self._ranks = range(len(pending)) if output == "all" else range(1)
        self._prefix = output == "all"
        self._offsets: dict[tuple[int, str], int] = {}
        self._partial: dict[tuple[int, str], str] = {}

    def pump(self, final: bool = False) -> None:
        for rank in self._ranks:
            md = self._pending[rank].metadata
            for name in ("stdout", "stderr"):
                text: str = md.get(name) or ""
                key = (rank, name)
                start = self._offsets.get(key, 0)
                if len(text) <= start:
                    continue
                self._offsets[key] = len(text)
                self._write(key, text[start:], final)
        if final:
            for key in list(self._partial):
                self._write(key, "\n", final=True)

    def _write(self, key: tuple[int, str], chunk: str, final: bool) -> None:
        stream = sys.stdout if key[1] == "stdout" else sys.stderr
        if not self._prefix:
            stream.write(chunk)
            stream.flush()
            return
        chunk = self._partial.pop(key, "") + chunk
        lines = chunk.split("\n")
        tail = lines.pop()
        if tail:
            self._partial[key] = tail
        if lines:
            stream.write("".join(f"[rank {key[0]}] {line}\n" for line in lines))
            stream.flush()


def _outcome(ar: Any, rank: int) -> CellOutcome:
    """A finished rank's outcome; an ipyparallel-level error becomes a failed outcome."""
    try:
        result = ar.result()
    except Exception as exc:  # noqa: BLE001 - e.g. the engine could not send its result
        render = getattr(exc, "render_traceback", None)
        ename = getattr(exc, "ename", None) or type(exc).__name__  # a RemoteError names what it wraps
        text = "\n".join(render()) if callable(render) else f"{ename}: {exc}"
        return CellOutcome(rank=rank, ok=False, ename=ename, evalue=str(exc), traceback=text)
    assert isinstance(result, CellOutcome)
    return result


def _await_exits(pool: Pool, seconds: float) -> list[EngineExit]:
    deadline = time.monotonic() + seconds
    exits = pool.exits()
    while not exits and time.monotonic() < deadline:
        time.sleep(0.05)
        exits = pool.exits()
    return exits


def _ranks_were(ranks: list[int]) -> str:
    listed = ", ".join(map(str, ranks))
    return f"Rank {listed} was" if len(ranks) == 1 else f"Ranks {listed} were"


def _failure_error(failed: list[CellOutcome], extra: str = "", lost: bool = False) -> DistributedCellError:
    """One error for the cell: the first failing rank's traceback, others only if different."""
    failed = sorted(failed, key=lambda o: o.rank)
    shown: dict[int, str] = {}
    for o in failed:
        if o.traceback not in shown.values():
            shown[o.rank] = o.traceback
    first = failed[0]
    ranks = ", ".join(str(o.rank) for o in failed)
    where = f"rank {ranks}" if len(failed) == 1 else f"ranks {ranks}"
    summary = f"{first.ename} on {where}: {first.evalue}"
    if extra:
        summary += f"\n{extra}"
    return DistributedCellError(summary, shown, lost_state=lost)


class CellRunner:
    def __init__(self, pool: Pool, *, output: str = "rank0", observers: Sequence[CellObserver] = ()):
        self.pool = pool
        self.output = output
        self.observers = list(observers)

    def run(self, source: str, *, backend: str, strategy: str, formation: Formation | None = None,
            timeout: float | None, line_offset: int = 0) -> CellResult:
        pool = self.pool
        exits = pool.exits()
        if exits:  # an engine died between cells: recover before running anything on it
            seconds = pool.recover()
            print(f"nbdist: {'; '.join(x.describe() for x in exits)} since the last cell. "
                  f"{LOST_STATE} (recovered in {seconds:.1f} s)", file=sys.stderr)
        pool.ensure_backend(backend, formation)
        cell_id = pool.next_cell_id()
        started = time.monotonic()
        pending = [
            view.apply_async(engine_side.run_cell, source, cell_id, strategy, rank == 0, line_offset)
            for rank, view in enumerate(pool.views)
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
            pool.history.extend(self.store.records)
            for obs in self.observers:
                obs.cell_finished(ok)
        rank0 = outcomes[0]
        return CellResult(rank0.value, outcomes, time.monotonic() - started, rank0.display)

    def _watch(self, pending: list[Any], stream: OutputStream, started: float,
               timeout: float | None) -> list[CellOutcome]:
        pool = self.pool
        grace = pool.config.grace
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
                exits = pool.exits()
                if exits:
                    stream.pump(final=True)
                    raise self._engine_died(exits, done)
                if len(done) == len(pending):
                    break
                now = time.monotonic()
                failed = [o for o in done.values() if not o.ok]
                if failed and first_failure is None:
                    first_failure = now
                if first_failure is not None and now - first_failure > grace:
                    stream.pump(final=True)
                    stuck = [r for r, ar in enumerate(pending) if not ar.done()]
                    pool.recover()
                    raise _failure_error(
                        failed,
                        f"{_ranks_were(stuck)} still waiting (most likely in a collective for the "
                        f"failed rank) and {'was' if len(stuck) == 1 else 'were'} stopped. {LOST_STATE}",
                        lost=True,
                    )
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
            exits = _await_exits(pool, DEATH_SETTLE_SECONDS)
            if exits:
                raise self._engine_died(exits, {o.rank: o for o in outcomes})
        if failed:
            raise _failure_error(failed, "Engine state is kept: the pool is ready for the next cell.")
        return outcomes

    def _collect(self) -> None:
        for rank, ar in enumerate(self._pending):
            self.store.ingest(rank, ar.metadata.get("data") or {})

    def _engine_died(self, exits: list[EngineExit], done: dict[int, CellOutcome]) -> DistributedCellError:
        seconds = self.pool.recover()
        lines = [x.describe() for x in exits]
        tracebacks = {o.rank: o.traceback for o in done.values() if not o.ok}
        summary = (
            f"EngineDied: {'; '.join(lines)}.\n{LOST_STATE} (recovered in {seconds:.1f} s)"
        )
        return DistributedCellError(summary, tracebacks, lost_state=True)

    def _stop(self, pending: list[Any], stream: OutputStream, reason: str) -> DistributedCellError:
        """Interrupt every rank still running; if any cannot stop (a gloo collective ignores
        SIGINT), free it by restarting the pool."""
        pool = self.pool
        running = [rank for rank, ar in enumerate(pending) if not ar.done()]
        for rank in running:
            try:
                pool.views[rank].client.send_signal(
                    signal.SIGINT, targets=[pool.engines[rank].engine_id], block=False
                )
            except Exception:  # noqa: BLE001 - an engine that cannot be signalled is handled below
                pass
        waiting = [pending[r] for r in running]
        futures.wait(waiting, timeout=pool.config.grace)
        stream.pump(final=True)
        still = [r for r in running if not pending[r].done()]
        tracebacks = {}
        for rank, ar in enumerate(pending):
            if ar.done():
                outcome = _outcome(ar, rank)
                if not outcome.ok and not outcome.interrupted:
                    tracebacks[rank] = outcome.traceback
        if still or pool.exits():
            seconds = pool.recover()
            return DistributedCellError(
                f"{reason} Ranks {', '.join(map(str, still))} did not stop (blocked in a "
                f"collective) and were killed. {LOST_STATE} (recovered in {seconds:.1f} s)",
                tracebacks, lost_state=True,
            )
        return DistributedCellError(
            f"{reason} Every rank stopped; engine state is kept and the pool is ready.",
            tracebacks,
        )


def gather_or_fail(pool: Pool, pending: list[Any], *, what: str, timeout: float) -> list[Any]:
    """Wait for a setup call on every rank; on failure or timeout, free the pool and say so."""
    done, not_done = futures.wait(pending, timeout=timeout, return_when=futures.FIRST_EXCEPTION)
    errors: dict[int, str] = {}
    for rank, ar in enumerate(pending):
        if ar in done and ar.exception() is not None:
            exc = ar.exception()
            render = getattr(exc, "render_traceback", None)
            errors[rank] = "\n".join(render()) if callable(render) else repr(exc)
    if not errors and not not_done:
        return [ar.result() for ar in pending]
    if not_done:
        futures.wait(not_done, timeout=pool.config.grace)
    if any(not ar.done() for ar in pending):
        pool.recover()
        reason = "failed" if errors else f"did not finish within {timeout:g} s"
        raise DistributedCellError(f"{what} {reason}. {LOST_STATE}", errors, lost_state=True)
    raise DistributedCellError(f"{what} failed.", errors)
