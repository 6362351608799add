"""pdb on an engine, driven from the notebook: after a failed cell (`%nbdist debug`) or at
`nbdist.breakpoint()` while a cell runs on rank 0.

pdb reads its commands from `_Channel.readline`: that publishes what pdb printed (ending with
its prompt) into the running request's data, where the kernel shows it and asks the user, and
waits for the answer the kernel writes into a file of this engine's own private folder. The
engine's main thread may be in the middle of a cell, so nothing here waits on ipyparallel.
"""

from __future__ import annotations

import os
import pdb
import shutil
import sys
import tempfile
import time
from types import FrameType, TracebackType
from typing import IO, Any, cast

from nbdist.engine._context import _CONTEXT

DEBUG_KEY_PREFIX = "nbdist-debug:"
CELL_FILE = "<distributed cell "


class _Channel:
    """pdb's stdin and stdout at once."""

    def __init__(self) -> None:
        self.folder = tempfile.mkdtemp(prefix="nbdist-debug-")
        self.reply = os.path.join(self.folder, "reply")
        self.printed: list[str] = []
        self.seq = 0

    def write(self, text: str) -> int:
        self.printed.append(text)
        return len(text)

    def flush(self) -> None:
        pass

    def readline(self, size: int = -1) -> str:
        from ipyparallel.datapub import publish_data

        publish_data({f"{DEBUG_KEY_PREFIX}{self.seq}": {"output": "".join(self.printed), "reply": self.reply}})
        self.seq += 1
        self.printed = []
        while not os.path.exists(self.reply):
            time.sleep(0.05)
        with open(self.reply) as handle:
            line = handle.read()
        os.unlink(self.reply)
        return line if line.endswith("\n") else line + "\n"

    def close_folder(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _debugger(channel: _Channel) -> pdb.Pdb:
    io_channel = cast(IO[str], channel)
    debugger = pdb.Pdb(stdin=io_channel, stdout=io_channel, nosigint=True)
    debugger.use_rawinput = False
    debugger.prompt = "(Pdb) "
    return debugger


def _from_cell(tb: TracebackType | None) -> TracebackType | None:
    """The traceback from the cell's own frame on (nbdist's frames above it are not the user's)."""
    start = tb
    while start is not None and not start.tb_frame.f_code.co_filename.startswith(CELL_FILE):
        start = start.tb_next
    return start or tb


def post_mortem() -> str:
    """Debug the exception of this rank's last failed cell; returns what pdb printed last."""
    failure = _CONTEXT.last_failure
    if failure is None:
        raise RuntimeError("no failed cell on this rank to debug: %nbdist debug follows a cell that failed here")
    channel = _Channel()
    try:
        debugger = _debugger(channel)
        debugger.reset()
        debugger.interaction(None, _from_cell(failure.__traceback__))
    finally:
        channel.close_folder()
    return "".join(channel.printed)


def breakpoint(frame: FrameType | None = None) -> None:
    """Stop here on rank 0 and debug in the notebook; the other ranks go on until they wait for
    rank 0 (at its next collective). `c` continues the cell, `q` ends it on every rank."""
    info = _CONTEXT.info
    if info is None or info.rank != 0:
        return
    if info.store is None:
        print("nbdist.breakpoint() needs the engines on the notebook's machine: it is skipped here.",
              file=sys.stderr)
        return
    channel = _Channel()
    _CONTEXT.debug_channels.append(channel)
    _debugger(channel).set_trace(frame or sys._getframe(1))


def close_channels() -> None:
    """After a cell: remove the folders of its breakpoints' channels."""
    while _CONTEXT.debug_channels:
        channel: Any = _CONTEXT.debug_channels.pop()
        channel.close_folder()
