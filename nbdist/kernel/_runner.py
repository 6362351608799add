"""Running one cell on every rank: streaming its output, feeding observers, and ending it
within seconds when a rank fails, an engine dies, the pool is stopped or the user interrupts.

When a rank fails while others still run, the others' stacks decide: a rank waiting in a
collective for the failed rank can never finish and is stopped; a rank still computing is
given the chance to finish, and engine state is kept.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any, Protocol

from nbdist._errors import DistributedCellError
from nbdist._interrupts import interrupt_flag
from nbdist._say import say
from nbdist._wire import CellOutcome, remote_traceback, shown
from nbdist.cluster import EngineExit, forget_outputs, published
from nbdist.engine import _cell as engine_cell
from nbdist.engine._stacks import STACK_KEY_PREFIX
from nbdist.kernel._contain import LOST_STATE, Ranks, settle
from nbdist.kernel._debugger import DebugRelay
from nbdist.kernel._history import History
from nbdist.kernel._output import OutputStream
from nbdist.kernel._store import MetricStore
from nbdist.kernel._where import Where, parse

POLL_SECONDS = 0.1
LOOK_SECONDS = 2.0  # how often the stacks of ranks still running after a failure are read again
DUMP_WAIT_SECONDS = 1.0  # how long a stack dump may take to arrive
ENGINE_DIED = "EngineError"  # what ipyparallel fails a task with when its engine dies
DEATH_SETTLE_SECONDS = 3.0  # how long the controller's word of that death may trail the failure
KEPT = "Engine state is kept: the pool is ready for the next cell."
STOPPED = ("The pool was stopped while this cell ran (`%nbdist stop` or Pool.stop()): nothing more will come "
           "from its ranks. Start a pool again with `%nbdist start`.")


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
    retries: int = 0
    """How many times the cell was run again after a failure (`--retries`)."""
    retry_seconds: list[float] = field(default_factory=list)
    """For each retry, the seconds from the failure until the cell ran again (replacing the
    engines and forming the group; the steps since the last checkpoint come on top)."""


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


def _listed(ranks: Sequence[int]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {', '.join(map(str, ranks))}"


def _failure(failed: list[CellOutcome]) -> tuple[str, dict[int, str], dict[int, list[int]]]:
    """Each distinct error once with the ranks that raised it; each distinct traceback once,
    with every rank that raised it."""
    failed = sorted(failed, key=lambda o: o.rank)
    shown_tb: dict[int, str] = {}
    same: dict[int, list[int]] = {}
    for o in failed:
        first = next((r for r, tb in shown_tb.items() if tb == o.traceback), None)
        if first is None:
            shown_tb[o.rank], same[o.rank] = o.traceback, [o.rank]
        else:
            same[first].append(o.rank)
    errors: dict[tuple[str, str], list[int]] = {}
    for o in failed:
        errors.setdefault((o.ename, o.evalue), []).append(o.rank)
    summary = "; ".join(f"{ename} on {_listed(ranks)}: {evalue}" for (ename, evalue), ranks in errors.items())
    return summary, shown_tb, same


class CellRunner:
    def __init__(self, ranks: Ranks, *, output: str = "rank0", observers: Sequence[CellObserver] = (),
                 history: History | None = None) -> None:
        self.ranks = ranks
        self.output = output
        self.observers = list(observers)
        self.history = history
        self.store = MetricStore()
        self._pending: dict[int, Any] = {}
        self._subset: tuple[int, ...] | None = None
        self._debug = DebugRelay()
        self._backend = ""
        self.retrying = False
        """Set while a failure will be followed by another run of the same cell."""

    def run(self, source: str, *, cell_id: str, backend: str, strategy: str, timeout: float | None,
            line_offset: int = 0, only: Sequence[int] | None = None, again: bool = False) -> CellResult:
        """Run `source` on every rank, or on the ranks `only` names (the first of them gives the
        value); a collective in such a cell is refused on the engines, or found in their stacks.
        `again`: the same cell once more after a failure (`--retries`), its metrics and its
        observers going on from where it failed."""
        started = time.monotonic()
        views = self.ranks.views
        chosen = list(only) if only is not None else list(range(len(views)))
        subset = tuple(chosen) if len(chosen) < len(views) else None
        pending = {
            rank: views[rank].apply_async(engine_cell.run_cell, source, cell_id, backend, strategy,
                                          rank == chosen[0], line_offset, subset)
            for rank in chosen
        }
        self._subset = subset
        self._backend = backend
        stream = OutputStream(list(pending.values()), self.output, ranks=chosen)
        if again:
            self.store.restart(time.time())
        else:
            self.store = MetricStore(cell=cell_id)
            for obs in self.observers:
                obs.cell_started(self.store)
        self._pending = pending
        ok = False
        try:
            outcomes = self._watch(pending, stream, started, timeout)
            ok = True
        finally:
            self._collect()
            for ar in pending.values():
                forget_outputs(ar)
            if ok or not self.retrying:
                self.finish(ok)
        first = outcomes[0]
        value = shown(first.value, "the cell's last value")
        return CellResult(value, outcomes, time.monotonic() - started, first.display)

    def finish(self, ok: bool) -> None:
        """The cell is over (after its last try): its records join the history, observers end."""
        if self.history is not None:
            self.history.extend(self.store.records)
        for obs in self.observers:
            obs.cell_finished(ok)

    def _watch(self, pending: dict[int, Any], stream: OutputStream, started: float,
               timeout: float | None) -> list[CellOutcome]:
        ranks = self.ranks
        first_failure: float | None = None
        next_look = 0.0
        computing: dict[int, Where | None] = {}
        # The flag also catches an interrupt whose KeyboardInterrupt was lost: raised while a
        # finalizer (__del__, a weakref callback) ran on this thread, Python prints and drops it.
        with interrupt_flag() as interrupted:
            try:
                while True:
                    waiting = [ar for ar in pending.values() if not ar.done()]
                    if waiting:
                        futures.wait(waiting, timeout=POLL_SECONDS, return_when=futures.FIRST_COMPLETED)
                    if interrupted.is_set():
                        raise KeyboardInterrupt
                    if not ranks.running:
                        raise DistributedCellError(STOPPED, {}, stopped=True)
                    stream.pump()
                    for rank, ar in pending.items():
                        if self._debug.serve(rank, ar):
                            stream.pump()
                    self._collect()
                    for obs in self.observers:
                        obs.cell_polled()
                    done = {rank: _outcome(ar, rank) for rank, ar in pending.items() if ar.done()}
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
                    if first_failure is not None and now - first_failure > ranks.grace and now >= next_look:
                        computing = self._after_failure(pending, stream, failed, computing)
                        next_look = time.monotonic() + LOOK_SECONDS
                    elif self._subset is not None and now - started > ranks.grace and now >= next_look:
                        self._check_subset(pending, stream)
                        next_look = time.monotonic() + LOOK_SECONDS
                    if timeout is not None and now - started > timeout:
                        raise self._stop(pending, stream, f"The cell timed out after {timeout:g} s.")
            except KeyboardInterrupt:
                raise self._stop(pending, stream, "The cell was interrupted.") from None
        for ar in pending.values():
            ar.wait_for_output(timeout=1.0)
        stream.pump(final=True)
        outcomes = [_outcome(ar, rank) for rank, ar in pending.items()]
        failed = [o for o in outcomes if not o.ok]
        if any(o.ename == ENGINE_DIED for o in failed):
            # ipyparallel failed a task because its engine died; the controller's word of it
            # (and the exit status) can trail the failed result by a moment.
            exits = _await_exits(ranks, DEATH_SETTLE_SECONDS)
            if exits:
                raise self._engine_died(exits, {o.rank: o for o in outcomes})
        if failed:
            summary, tracebacks, same = _failure(failed)
            finished = [r for r in computing if r not in {o.rank for o in failed}]
            if finished:
                summary += f"\n{_listed(finished).capitalize()} kept computing after the failure and finished."
            raise settle(ranks, f"{summary}\n", tracebacks, kept=KEPT, same=same)
        return outcomes

    def _after_failure(self, pending: dict[int, Any], stream: OutputStream, failed: list[CellOutcome],
                       before: dict[int, Where | None]) -> dict[int, Where | None]:
        """Stop the ranks that wait in a collective for a failed rank (they never finish);
        return those still computing, to look at again."""
        running = [r for r, ar in pending.items() if not ar.done()]
        where = self._where(pending, running)
        stuck = [r for r in running if _stuck(where.get(r), before.get(r, _UNSEEN))]
        if not stuck:
            return {r: where.get(r) for r in running}
        stream.pump(final=True)
        summary, tracebacks, same = _failure(failed)
        lines = [_describe(r, where.get(r)) for r in stuck]
        verb = "was" if len(stuck) == 1 else "were"
        raise settle(ranks=self.ranks, summary=f"{summary}\n{'; '.join(lines)}: waiting for the failed rank, "
                     f"{'it' if len(stuck) == 1 else 'they'} {verb} stopped.", tracebacks=tracebacks, stuck=stuck,
                     same=same)

    def _where(self, pending: dict[int, Any], ranks: Sequence[int]) -> dict[int, Where | None]:
        """Each rank's place, from a stack dump it publishes into its running cell's data."""
        if not ranks:
            return {}
        seen = {r: _stack_keys(pending[r]) for r in ranks}
        self.ranks.dump_stacks(ranks)
        deadline = time.monotonic() + DUMP_WAIT_SECONDS
        dumps: dict[int, str] = {}
        while len(dumps) < len(ranks) and time.monotonic() < deadline:
            time.sleep(0.02)
            for r in ranks:
                new = sorted(_stack_keys(pending[r]) - seen[r], key=lambda k: int(k.rpartition(":")[2]))
                if new and r not in dumps:
                    dumps[r] = str(published(pending[r])[new[-1]])
        return {r: parse(dumps[r]) if r in dumps else None for r in ranks}

    def _check_subset(self, pending: dict[int, Any], stream: OutputStream) -> None:
        """A cell on some ranks that waits in a collective waits for ranks that never join it."""
        running = [r for r, ar in pending.items() if not ar.done()]
        where = self._where(pending, running)
        stuck = [r for r in running if (w := where.get(r)) is not None and w.in_collective]
        if stuck:
            stream.pump(final=True)
            assert self._subset is not None
            lines = "; ".join(_describe(r, where.get(r)) for r in stuck)
            raise settle(self.ranks, f"{lines}: a collective in a cell that runs on {_listed(self._subset)} only "
                         "waits for ranks that do not run it. Run collectives on every rank (leave out --ranks).",
                         {}, stuck=stuck)

    def _collect(self) -> None:
        for rank, ar in self._pending.items():
            self.store.ingest(rank, published(ar))

    def _engine_died(self, exits: list[EngineExit], done: dict[int, CellOutcome]) -> DistributedCellError:
        # A rank whose engine died has only ipyparallel's own traceback: nothing of the user's.
        tracebacks = {o.rank: o.traceback for o in done.values() if not o.ok and o.ename != ENGINE_DIED}
        return settle(self.ranks, f"EngineDied: {'; '.join(x.describe() for x in exits)}.\n", tracebacks,
                      exits=exits)

    def _stop(self, pending: dict[int, Any], stream: OutputStream, reason: str) -> DistributedCellError:
        """Interrupt every rank still running; if any cannot stop (a gloo collective ignores
        SIGINT), free it by restarting the pool. The message says where each rank was."""
        ranks = self.ranks
        if not ranks.running:
            return DistributedCellError(f"{reason} {STOPPED}", {}, stopped=True)
        running = [rank for rank, ar in pending.items() if not ar.done()]
        where = self._where(pending, running)
        if running:
            reason += f" Where the ranks were: {'; '.join(_describe(r, where.get(r)) for r in running)}."
        ranks.interrupt(running)
        futures.wait([pending[r] for r in running], timeout=ranks.grace)
        stream.pump(final=True)
        still = [r for r in running if not pending[r].done()]
        broken = [r for r in running
                  if r not in still and self._backend == "tensorflow" and _in_tensorflow(where.get(r))]
        if broken:
            reason += (f" {_listed(broken).capitalize()} stopped inside TensorFlow, whose collectives cannot resume "
                       "after an interrupt (the next one fails with 'Collective instance ... expected type'), so the "
                       "engines were replaced.")
        tracebacks = {}
        for rank, ar in pending.items():
            if ar.done():
                outcome = _outcome(ar, rank)
                if not outcome.ok and not outcome.interrupted:
                    tracebacks[rank] = outcome.traceback
        exits = ranks.exits()
        if still:
            reason += f" Ranks {', '.join(map(str, still))} did not stop (blocked in a collective) and were killed."
        error = settle(ranks, reason, tracebacks, stuck=still + broken, exits=exits,
                       kept="Every rank stopped; engine state is kept and the pool is ready.")
        error.stopped = True
        return error


_UNSEEN = object()


def _stack_keys(ar: Any) -> set[str]:
    return {k for k in published(ar) if k.startswith(STACK_KEY_PREFIX)}


def _stuck(now: Where | None, before: Any) -> bool:
    """A rank can never finish when it waits in a collective for the failed rank. Waiting
    inside a framework call the same way twice in a row (DDP's backward waiting for its
    all-reduce) counts too; a rank whose stack cannot be read is treated as stuck."""
    if now is None:
        return True
    if now.in_collective:
        return True
    return isinstance(before, type(now)) and before.frames == now.frames and now.in_framework


def _in_tensorflow(where: Where | None) -> bool:
    """Whether a rank was inside TensorFlow or its Keras (a `fit`, a step function) when stopped."""
    return where is not None and any(part in frame for frame in where.frames
                                     for part in ("/tensorflow/", "/tf_keras/", "/keras/"))


def _describe(rank: int, where: Where | None) -> str:
    return where.describe(rank) if where is not None else f"rank {rank} (its stack could not be read)"
