"""A helper process of the kernel that writes `--tensorboard` events after a cell returns.

TensorBoard's writer spends tens of microseconds of Python per record (its checksum is pure
Python when TensorFlow is not imported), about 2 s for a 20 s cell reporting 400 steps a second
on each of 2 ranks. Done in the kernel, the cell returned that much later; done on a kernel
thread, it would hold the GIL the poll loop needs. So one child process per kernel writes them,
at idle priority (it takes only CPU time the engines leave), and the kernel only hands it a file.

Jobs go by file, not through the pipe: a pipe holds 64 KiB, and a kernel writing megabytes of
records to a child that gets no CPU while the engines train would block until the child read
them. The child exits when the kernel closes its end of the pipe, after the jobs it was given, so
a killed kernel loses no events and leaves no process behind once they are written.

`TensorBoardObserver` is the `--tensorboard` option's cell observer that hands each cell over;
`_tensorboard` holds the writing itself, which runs in the child.
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import os
import pickle
import select
import subprocess
import sys
import tempfile
import threading
from collections.abc import Mapping, Sequence
from typing import IO, Any

from nbdist._errors import ConfigError
from nbdist._say import say
from nbdist.kernel._store import MetricStore
from nbdist.kernel._tensorboard import run_name, write_cell


class BackgroundWriter:
    """The kernel's side: `submit` a cell's records, `flush` to wait until they are on disk."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        self._pending = 0
        self._lock = threading.Lock()

    def submit(self, rows: Sequence[Mapping[str, Any]], logdir: str, run: str) -> None:
        with self._lock:
            self._collect(block=False)
            handle, path = tempfile.mkstemp(prefix="nbdist-tensorboard-", suffix=".pickle")
            with os.fdopen(handle, "wb") as job:
                pickle.dump((list(rows), logdir, run), job, protocol=pickle.HIGHEST_PROTOCOL)
            proc = self._started()
            assert proc.stdin is not None
            proc.stdin.write(path.encode() + b"\n")
            proc.stdin.flush()
            self._pending += 1

    def flush(self, timeout: float | None = None) -> list[str]:
        """Wait for every submitted cell's events; return their run folders."""
        with self._lock:
            return self._collect(block=True, timeout=timeout)

    def close(self) -> None:
        """Let the child finish what it was given, then exit (it does so on its own)."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.stdin is not None:
            proc.stdin.close()

    def _started(self) -> subprocess.Popen[bytes]:
        if self._proc is None or self._proc.poll() is not None:
            self._proc = subprocess.Popen([sys.executable, "-m", "nbdist.kernel._tbwriter"],
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            self._pending = 0
        return self._proc

    def _collect(self, block: bool, timeout: float | None = None) -> list[str]:
        """Read the child's answers: all that are due (`block`) or those already there."""
        proc, folders = self._proc, []
        while proc is not None and proc.stdout is not None and self._pending:
            ready, _, _ = select.select([proc.stdout], [], [], timeout if block else 0)
            if not ready:
                if block:
                    raise TimeoutError(f"TensorBoard events of {self._pending} cell(s) not written after {timeout} s")
                break
            line = proc.stdout.readline()
            if not line:  # the child died: say so rather than wait for it
                say(f"the TensorBoard writer stopped (exit status {proc.wait()}); events of "
                    f"{self._pending} cell(s) may be missing. The next --tensorboard cell starts a new one.",
                    unasked=True)
                self._pending = 0
                break
            self._pending -= 1
            answer = json.loads(line)
            if "error" in answer:
                say(f"writing TensorBoard events failed: {answer['error']}", unasked=True)
            else:
                folders.append(answer["folder"])
        return folders


WRITER = BackgroundWriter()
atexit.register(WRITER.close)


class TensorBoardObserver:
    """Writes each cell's metrics to TensorBoard once the cell ends (`--tensorboard DIR`), in a
    helper process (below), so the cell returns without waiting for the writing."""

    def __init__(self, logdir: str) -> None:
        if importlib.util.find_spec("tensorboard") is None:
            raise ConfigError("--tensorboard needs the tensorboard package: pip install 'nbdist[tensorboard]' "
                              "(or pip install tensorboard), or leave the option out")
        try:
            os.makedirs(logdir, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"--tensorboard {logdir}: cannot make that folder ({exc.strerror}): "
                              "give a folder you can write to") from None
        self.logdir = logdir
        self._store: MetricStore | None = None

    def cell_started(self, store: MetricStore) -> None:
        self._store = store

    def cell_polled(self) -> None:
        pass

    def cell_finished(self, ok: bool) -> None:
        if self._store is not None and self._store.records:
            WRITER.submit(self._store.records, self.logdir, run_name(self._store.records))


def flush(timeout: float | None = 60.0) -> list[str]:
    """Wait until the events of every `--tensorboard` cell so far are on disk; return their run
    folders. Cells return before their events are written (TensorBoard reloads on its own)."""
    return WRITER.flush(timeout)


def _idle_priority() -> None:
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        os.nice(19)


def _serve(jobs: IO[bytes], answers: IO[str]) -> None:
    for line in jobs:
        path = line.decode().strip()
        try:
            with open(path, "rb") as job:
                rows, logdir, run = pickle.load(job)
            answer = {"folder": write_cell(rows, logdir, run)}
        except Exception as exc:  # noqa: BLE001 - reported to the kernel, which says it
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        finally:
            if os.path.exists(path):
                os.unlink(path)
        answers.write(json.dumps(answer) + "\n")
        answers.flush()


if __name__ == "__main__":
    _idle_priority()
    _serve(sys.stdin.buffer, sys.stdout)
