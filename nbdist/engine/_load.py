"""Device load sampled on an engine while a cell runs: NVML for a GPU, psutil for the CPU."""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable
from typing import Any

import psutil

SAMPLE_SECONDS = 0.5


@functools.cache
def _gpu_probe(gpu: str | None) -> Callable[[], dict[str, float]] | None:
    """Once per engine and GPU set: NVML's init and handle lookups cost more than a no-op cell."""
    if gpu is None:
        return None
    try:
        import pynvml

        pynvml.nvmlInit()
        # An engine may own several GPUs ("0,1", for MirroredStrategy): mean utilisation, total memory.
        handles = [pynvml.nvmlDeviceGetHandleByIndex(int(i)) for i in gpu.split(",")]
    except Exception:  # noqa: BLE001 - no NVML: report CPU load only
        return None

    def probe() -> dict[str, float]:
        utils = [pynvml.nvmlDeviceGetUtilizationRates(h).gpu for h in handles]
        used = sum(pynvml.nvmlDeviceGetMemoryInfo(h).used for h in handles)
        return {"gpu_util": float(sum(utils)) / len(utils), "gpu_mem_mb": used / 2**20}

    return probe


_PROCESSES: dict[int, psutil.Process] = {}


def _this_process() -> psutil.Process:
    pid = os.getpid()  # keyed by pid: a forked child must not read its parent's figures
    if pid not in _PROCESSES:
        _PROCESSES[pid] = psutil.Process(pid)
    return _PROCESSES[pid]


class _Ticker:
    """One thread per engine that samples the running cell's `LoadSampler`, asleep between
    cells. Starting and joining a thread (and building psutil's view of the process) for each
    cell cost a no-op cell a third of its time on the engine."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # held while a sample is taken: `detach` waits for it
        self._active: LoadSampler | None = None
        self._changed = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid = 0

    def attach(self, sampler: LoadSampler) -> None:
        with self._lock:
            self._active = sampler
            if self._thread is None or not self._thread.is_alive() or self._pid != os.getpid():
                self._pid = os.getpid()
                self._thread = threading.Thread(target=self._loop, name="nbdist-load", daemon=True)
                self._thread.start()
        self._changed.set()

    def detach(self, sampler: LoadSampler) -> None:
        """After this returns, no sample of `sampler` is taken or in progress."""
        with self._lock:
            if self._active is sampler:
                self._active = None
        self._changed.set()

    def _loop(self) -> None:
        while True:
            self._changed.wait()
            self._changed.clear()
            sampler = self._active
            # Sample every `interval` from the cell's start; a new cell starts the count again.
            while sampler is not None and not self._changed.wait(sampler.interval):
                with self._lock:
                    if self._active is not sampler:
                        break
                    sampler.tick()


_TICKER = _Ticker()


class LoadSampler:
    """Samples about twice a second while a cell runs, handing records to `sink`."""

    def __init__(self, sink: Callable[[dict[str, Any]], None], gpu: str | None,
                 interval: float = SAMPLE_SECONDS, extra: Callable[[], dict[str, float]] | None = None) -> None:
        self._sink = sink
        # The backend's parameter / gradient / optimizer memory. It reads tensors (`.grad`) that
        # backward writes without the GIL, so it runs on the training thread between steps
        # (`between_steps`): scanned from the sampling thread it crashed engines with SIGSEGV.
        self._extra = extra
        self._extra_due = threading.Event()
        self._extra_due.set()  # the first report scans: samples carry memory from the start
        self._extra_values: dict[str, float] = {}
        self.interval = interval
        self._gpu = _gpu_probe(gpu)
        self._process = _this_process()

    def start(self) -> LoadSampler:
        self._process.cpu_percent(None)  # prime: the first reading covers the cell from here
        _TICKER.attach(self)
        return self

    def sample(self) -> dict[str, Any]:
        record: dict[str, Any] = {
            "kind": "load",
            "cpu": self._process.cpu_percent(None),
            "rss_mb": self._process.memory_info().rss / 2**20,
        }
        if self._gpu is not None:
            record.update(self._gpu())
        record.update(self._extra_values)
        self._extra_due.set()
        return record

    def tick(self) -> None:
        self._sink(self.sample())

    def between_steps(self) -> None:
        """Called by the training thread (`nbdist.report()`); scans memory once per sample."""
        if self._extra is None or not self._extra_due.is_set():
            return
        self._extra_due.clear()
        try:
            self._extra_values = self._extra()
        except RuntimeError:  # the cell changed its namespace mid-scan: next sample
            pass

    def stop(self) -> None:
        _TICKER.detach(self)
