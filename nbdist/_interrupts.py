"""An interrupt that is never lost while a cell runs or a pool restarts.

The kernel's interrupt raises KeyboardInterrupt in its main thread. If that happens while a
finalizer runs there (an object's `__del__`, a weakref callback: ipyparallel and pyzmq objects
are collected in the poll loop all the time), Python prints the exception and drops it, and
the cell ran on as if nothing had been asked. The handler installed here also sets a flag the
poll loop checks, so the interrupt is acted on either way. Starting engines has the same hole:
ipyparallel's `*_sync` calls run an event loop that can swallow the KeyboardInterrupt.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any


@contextmanager
def interrupt_flag() -> Iterator[threading.Event]:
    flag = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield flag  # only the main thread receives signals: nothing to catch here
        return
    previous: Any = signal.getsignal(signal.SIGINT)

    def handler(signum: int, frame: FrameType | None) -> None:
        flag.set()
        if callable(previous):
            previous(signum, frame)
        else:
            signal.default_int_handler(signum, frame)

    signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)
