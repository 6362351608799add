"""Where a rank is, read from its stack dump: in a collective (and which, at which cell line),
or still computing. It decides whether a rank is stuck and says so in the user's words."""

from __future__ import annotations

import re
from dataclasses import dataclass

_FRAME = re.compile(r'^\s*File "(?P<file>[^"]+)", line (?P<line>\d+) in (?P<func>\S+)')
CELL_FILE = "<distributed cell "
# Frames that wait for other ranks: torch.distributed (gloo/NCCL calls, DDP's reducer hooks)
# and TensorFlow's collective ops.
_WRAPPERS = frozenset({"wrapper", "inner", "_fn", "decorate_context", "__call__"})
_COLLECTIVE_FILES = ("/torch/distributed/", "/tensorflow/python/ops/collective_ops", "/tensorflow/python/distribute/")


@dataclass(frozen=True)
class Where:
    """One rank's main thread at the moment of a dump."""

    cell_line: int | None
    """The line of the user's cell it is on (None if no cell frame was seen)."""
    function: str
    """The innermost function it is in."""
    collective: str | None
    """The torch.distributed / TensorFlow collective function it waits in, if any."""
    frames: tuple[str, ...] = ()

    @property
    def in_collective(self) -> bool:
        return self.collective is not None

    @property
    def in_framework(self) -> bool:
        """Inside a torch or TensorFlow call rather than on the cell's own line."""
        return bool(self.frames) and any(part in self.frames[0] for part in ("/torch/", "/tensorflow/"))

    def describe(self, rank: int) -> str:
        at = f" at cell line {self.cell_line}" if self.cell_line is not None else ""
        if self.collective is not None:
            return f"rank {rank} was in {self.collective}{at}"
        return f"rank {rank} was still computing{at} (in {self.function})"


def parse(dump: str) -> Where | None:
    """The main thread's place in a faulthandler dump (the thread running the cell)."""
    blocks = re.split(r"\n(?=(?:Current thread|Thread) 0x)", dump.strip())
    for block in blocks:
        frames = [m.groupdict() for line in block.splitlines() if (m := _FRAME.match(line))]
        cell = next((i for i, f in enumerate(frames) if f["file"].startswith(CELL_FILE)), None)
        if cell is None:
            continue
        inner = frames[:cell]  # most recent call first: what the cell line called into
        waiting = [f["func"] for f in reversed(inner) if any(part in f["file"] for part in _COLLECTIVE_FILES)]
        named = [func for func in waiting if func not in _WRAPPERS]  # the API call, not its decorators
        collective = (named or waiting or [None])[0]
        return Where(
            cell_line=int(frames[cell]["line"]),
            function=frames[0]["func"],
            collective=collective,
            frames=tuple(f"{f['file']}:{f['line']} {f['func']}" for f in frames),
        )
    return None
