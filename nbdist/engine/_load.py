"""Device load sampled on an engine while a cell runs: NVML for a GPU, psutil for the CPU."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import psutil

SAMPLE_SECONDS = 0.5


def _gpu_probe(gpu: str | None) -> Callable[[], dict[str, float]] | None:
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


class LoadSampler:
    """A daemon thread that samples about twice a second and hands records to `sink`."""

    def __init__(self, sink: Callable[[dict[str, Any]], None], gpu: str | None,
                 interval: float = SAMPLE_SECONDS, extra: Callable[[], dict[str, float]] | None = None) -> None:
        self._sink = sink
        # The backend's parameter / gradient / optimizer memory. It reads tensors (`.grad`) that
        # backward writes without the GIL, so it runs on the training thread between steps
        # (`between_steps`): scanned from this thread it crashed engines with SIGSEGV.
        self._extra = extra
        self._extra_due = threading.Event()
        self._extra_due.set()  # the first report scans: samples carry memory from the start
        self._extra_values: dict[str, float] = {}
        self._interval = interval
        self._gpu = _gpu_probe(gpu)
        self._process = psutil.Process()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="nbdist-load", daemon=True)

    def start(self) -> LoadSampler:
        self._process.cpu_percent(None)  # prime: the first reading is always 0
        self._thread.start()
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

    def between_steps(self) -> None:
        """Called by the training thread (`nbdist.report()`); scans memory once per sample."""
        if self._extra is None or not self._extra_due.is_set():
            return
        self._extra_due.clear()
        try:
            self._extra_values = self._extra()
        except RuntimeError:  # the cell changed its namespace mid-scan: next sample
            pass

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            self._sink(self.sample())

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2 * self._interval)
