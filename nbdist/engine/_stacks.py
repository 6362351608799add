"""Where this engine's threads are, on request, even while its main thread is blocked in C++.

A rank stuck in a gloo or NCCL collective never runs Python code again, so a Python signal
handler would never run; faulthandler's handler is C and writes every thread's Python stack
at once. It writes into a pipe, and a daemon thread publishes what arrives under a numbered
key, where the kernel reads it from the running cell's metadata.
"""

from __future__ import annotations

import faulthandler
import os
import select
import signal
import threading
from collections.abc import Callable

STACK_SIGNAL = signal.SIGUSR1
STACK_KEY_PREFIX = "nbdist-stack:"
_QUIET_SECONDS = 0.1  # a dump has ended when the pipe has been quiet this long

_armed = False


def arm(publish: Callable[[dict[str, str]], None] | None = None) -> None:
    """Dump every thread's stack on `STACK_SIGNAL` (once per engine; later calls do nothing)."""
    global _armed
    if _armed:
        return
    read_fd, write_fd = os.pipe()
    faulthandler.register(STACK_SIGNAL, file=write_fd, all_threads=True, chain=False)
    threading.Thread(target=_forward, args=(read_fd, publish), name="nbdist-stacks", daemon=True).start()
    _armed = True


def _publish_data(data: dict[str, str]) -> None:
    from ipyparallel.datapub import publish_data

    publish_data(data)


def _forward(read_fd: int, publish: Callable[[dict[str, str]], None] | None) -> None:
    send = publish or _publish_data
    seq = 0
    while True:
        chunks = [os.read(read_fd, 65536)]
        while select.select([read_fd], [], [], _QUIET_SECONDS)[0]:
            chunks.append(os.read(read_fd, 65536))
        try:
            send({f"{STACK_KEY_PREFIX}{seq}": b"".join(chunks).decode(errors="replace")})
        except Exception:  # noqa: BLE001 - no cell to publish to: the dump is simply not seen
            pass
        seq += 1
