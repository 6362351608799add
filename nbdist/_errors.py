"""Errors a user sees. Each message names the problem and the fix in one line."""

from __future__ import annotations


class NbdistError(Exception):
    """Base class, so a script can catch everything nbdist raises on purpose."""


class ConfigError(NbdistError, ValueError):
    """An option or argument that cannot work."""


class PoolStateError(NbdistError, RuntimeError):
    """The pool is in the wrong state for the request (not started, started twice, ...)."""


class PoolValueError(NbdistError, ValueError):
    """A value that cannot travel between the engines and the notebook (the message says why)."""


class PoolStartError(NbdistError, RuntimeError):
    """Engines did not come up; nothing is left running when this is raised."""


class DistributedCellError(NbdistError):
    """A `%%distributed` cell failed on at least one rank.

    IPython calls `_render_traceback_` instead of printing our own frames, so the
    user sees the failing rank's traceback (pointing at the cell's line) and not
    nbdist's internals.
    """

    def __init__(self, summary: str, tracebacks: dict[int, str], *, lost_state: bool = False,
                 same: dict[int, list[int]] | None = None, stopped: bool = False):
        super().__init__(summary)
        self.summary = summary
        self.tracebacks = tracebacks
        self.lost_state = lost_state
        self.stopped = stopped
        self.recovery_seconds = 0.0
        """How long replacing the engines took, when they were replaced."""
        """Ended by the user, a timeout or the pool's stop, not by the cell (never retried)."""
        self.same = same or {}
        """For a traceback shown once, every rank that raised it (keyed by the first)."""

    def _header(self, rank: int) -> str:
        ranks = self.same.get(rank, [rank])
        if len(ranks) == 1:
            return f"---- rank {rank} ----"
        return f"---- ranks {', '.join(map(str, ranks))} (the same error) ----"

    @property
    def ranks(self) -> list[int]:
        return sorted(self.tracebacks)

    @property
    def failed_ranks(self) -> list[int]:
        """Every rank that raised (a traceback shown once may stand for several)."""
        return sorted({r for first in self.tracebacks for r in self.same.get(first, [first])})

    def _render_traceback_(self) -> list[str]:
        lines: list[str] = []
        for rank in self.ranks:
            lines.append(self._header(rank))
            lines.extend(self.tracebacks[rank].rstrip("\n").splitlines())
        lines.append(self.summary)
        return lines

    def __str__(self) -> str:
        parts = [self.summary]
        for rank in self.ranks:
            parts.append(f"{self._header(rank)}\n{self.tracebacks[rank].rstrip()}")
        return "\n".join(parts)
