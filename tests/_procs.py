"""Process checks shared by the tests that must leave nothing running."""

from __future__ import annotations

import time
from collections.abc import Iterable

import psutil


def alive(pids: Iterable[int], command: str | None = None) -> list[int]:
    """Which of `pids` still run (zombies count as ended); with `command`, only those whose
    command line contains it (PIDs of another host's namespace share this machine's table)."""
    running = []
    for pid in pids:
        try:
            process = psutil.Process(pid)
            if process.status() == psutil.STATUS_ZOMBIE:
                continue
            if command is None or command in " ".join(process.cmdline()):
                running.append(pid)
        except psutil.Error:
            pass
    return running


def wait_gone(pids: Iterable[int], seconds: float = 20.0, command: str | None = None) -> list[int]:
    """Wait until none of `pids` runs; those still running after `seconds`."""
    pids = list(pids)
    deadline = time.monotonic() + seconds
    while alive(pids, command) and time.monotonic() < deadline:
        time.sleep(0.1)
    return alive(pids, command)
