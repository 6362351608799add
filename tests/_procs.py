"""Process checks shared by the tests that must leave nothing running."""

from __future__ import annotations

import ipaddress
import os
import time
from collections.abc import Iterable
from typing import Any

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


def pool_processes(pool: Any) -> set[int]:
    """The kernel (this process) and everything under it that the pool started."""
    pids = {os.getpid()}
    for engine in pool.engines:
        pids.add(engine.pid)
    me = psutil.Process()
    pids |= {c.pid for c in me.children(recursive=True)}
    return pids


def listeners(pids: set[int]) -> list[tuple[int, str, int]]:
    return [(c.pid, c.laddr.ip, c.laddr.port) for c in psutil.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and c.pid in pids]


def not_loopback(found: list[tuple[int, str, int]]) -> list[tuple[int, str, int]]:
    return [(pid, ip, port) for pid, ip, port in found if not ipaddress.ip_address(ip).is_loopback]
