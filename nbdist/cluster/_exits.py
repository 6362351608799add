"""How an engine ended, read from its exit status without racing ipyparallel's launcher for it."""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from typing import Any

import psutil

RUNNING = object()


@dataclass(frozen=True)
class EngineExit:
    rank: int
    host: str
    pid: int
    exit_code: int | None
    lost: bool = False
    """Seen only as gone from the controller (an engine on another host, or its host, died)."""

    def describe(self) -> str:
        code = self.exit_code
        if self.lost:
            how = "stopped answering the controller (the engine or its host is gone)"
        elif code is None:
            how = "exited"
        elif code < 0:
            try:
                how = f"was killed by {signal.Signals(-code).name}"
            except ValueError:
                how = f"was killed by signal {-code}"
        else:
            how = f"exited with code {code}"
        return f"rank {self.rank} (engine pid {self.pid} on {self.host}) {how}"


def await_exit(process: psutil.Process, seconds: float) -> Any:
    """The exit status of a process expected to end within `seconds`, or RUNNING."""
    deadline = time.monotonic() + seconds
    code = exit_status(process)
    while code is RUNNING and time.monotonic() < deadline:
        time.sleep(0.02)
        code = exit_status(process)
    return code


def exit_status(process: psutil.Process) -> Any:
    """The exit code of an engine we launched (negative: killed by that signal), or RUNNING.

    The launcher's own thread reaps the process; peeking with WNOWAIT leaves the zombie
    to it, so the two never race for the status (the loser of a race would get None)."""
    try:
        info = os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:  # already reaped by the launcher, which cached the code
        try:
            code = process.wait(timeout=0)
            return None if code is None else int(code)
        except psutil.TimeoutExpired:
            return RUNNING
    if info is None:
        return RUNNING
    if info.si_code in (os.CLD_KILLED, os.CLD_DUMPED):
        return -info.si_status
    return info.si_status
