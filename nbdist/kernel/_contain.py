"""Containing failures: what a cell runner may ask of the engines, and the one place that
decides whether they must be replaced.

The rule: the notebook never hangs. A rank that raises while others wait in a collective, an
engine that dies, a timeout or an interrupt all end the cell within seconds with a message
that says what happened and what state was lost.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent import futures
from typing import Any, Protocol

from nbdist._errors import DistributedCellError
from nbdist._patience import patience, waited
from nbdist._wire import remote_traceback
from nbdist.cluster import EngineExit

LOST_STATE = (
    "The pool was restarted with fresh engines: every variable on the engines is lost "
    "(re-run the cells that define them, or restore a checkpoint)."
)


class Ranks(Protocol):
    """What a cell runner may ask of a running pool's engines, and nothing more (the real
    one is `EngineCluster`; tests pass fakes with fake async results)."""

    @property
    def views(self) -> Sequence[Any]:
        """One ipyparallel view per rank, in rank order (each has `apply_async`)."""

    @property
    def grace(self) -> float:
        """Seconds the other ranks get to finish after one fails or is interrupted."""

    @property
    def running(self) -> bool:
        """False once the pool has been stopped (from another thread, say)."""

    def exits(self) -> list[EngineExit]:
        """Engines that have ended since they were adopted."""

    def dump_stacks(self, ranks: Sequence[int]) -> None:
        """Ask these ranks for their threads' stacks (they arrive in the running cell's data)."""

    def interrupt(self, ranks: Sequence[int]) -> None:
        """Send SIGINT to these ranks' engines."""

    def recover(self) -> float:
        """Replace every engine; the seconds it took."""


def settle(ranks: Ranks, summary: str, tracebacks: dict[int, str], *, stuck: Sequence[int] = (),
           exits: Sequence[EngineExit] = (), kept: str = "",
           same: dict[int, list[int]] | None = None) -> DistributedCellError:
    """The error that ends a failed cell, after replacing the engines where they must be: a
    rank still running (blocked, most likely in a collective) or an engine that died leaves
    the group unusable; otherwise engine state is kept and `kept` says so."""
    sep = "" if summary.endswith("\n") else " "
    if stuck or exits:
        seconds = ranks.recover()
        error = DistributedCellError(f"{summary}{sep}{LOST_STATE} (recovered in {seconds:.1f} s)", tracebacks,
                                     lost_state=True, same=same)
        error.recovery_seconds = seconds
        return error
    return DistributedCellError(f"{summary}{sep}{kept}".rstrip(), tracebacks, same=same)


def gather_or_fail(ranks: Ranks, pending: list[Any], *, what: str, timeout: float) -> list[Any]:
    """Wait for a setup call on every rank; on failure or timeout, free the pool and say so."""
    asked, timeout = timeout, patience(timeout)
    done, not_done = futures.wait(pending, timeout=timeout, return_when=futures.FIRST_EXCEPTION)
    errors = {rank: remote_traceback(exc) for rank, ar in enumerate(pending)
              if ar in done and (exc := ar.exception()) is not None}
    if not errors and not not_done:
        return [ar.result() for ar in pending]
    if not_done:
        futures.wait(not_done, timeout=ranks.grace)
    stuck = [rank for rank, ar in enumerate(pending) if not ar.done()]
    reason = "failed" if errors else f"did not finish within {waited(asked, timeout)}"
    exits = ranks.exits()
    deadline = time.monotonic() + 3.0  # the controller's word of an engine's death may trail its failed task
    while errors and not exits and "EngineError" in " ".join(errors.values()) and time.monotonic() < deadline:
        time.sleep(0.05)
        exits = ranks.exits()
    if exits:
        reason += f" ({'; '.join(x.describe() for x in exits)})"
    raise settle(ranks, f"{what} {reason}.", errors, stuck=stuck, exits=exits)
