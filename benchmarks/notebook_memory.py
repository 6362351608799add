"""Peak memory of each tutorial notebook, kernel and engines together, against Binder's ~2 GB.

    python benchmarks/notebook_memory.py [notebooks/01_quickstart.ipynb ...]

Executes each notebook headless (nbclient, outputs discarded) while sampling the proportional
set size (PSS) of the process tree under this script every 0.2 s: PSS counts a shared page once
across processes, as a container's memory limit does, where summed RSS would count the torch
libraries once per engine."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import nbformat
import psutil
from nbclient import NotebookClient

BINDER_MB = 2048


def tree_pss_mb(root: psutil.Process) -> float:
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            total += proc.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total / 2**20


def peak_while(run: Callable[[], object]) -> tuple[float, float]:
    """(peak MB, seconds) of the process tree while `run()` executes."""
    me = psutil.Process()
    peak = 0.0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, tree_pss_mb(me))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    started = time.perf_counter()
    sampler.start()
    try:
        run()
    finally:
        done.set()
        sampler.join()
    return peak, time.perf_counter() - started


def main() -> None:
    root = Path(__file__).resolve().parent.parent
    paths = [Path(p) for p in sys.argv[1:]] or sorted((root / "notebooks").glob("0*.ipynb"))
    print(f"| notebook | peak memory MB (PSS, kernel + engines) | of Binder's {BINDER_MB} MB | seconds |")
    print("| --- | --- | --- | --- |")
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        client = NotebookClient(nb, timeout=900, kernel_name="python3",
                                resources={"metadata": {"path": str(path.parent)}})
        peak, seconds = peak_while(client.execute)
        print(f"| {path.stem} | {peak:.0f} | {peak / BINDER_MB:.0%} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
