"""Where a cold start's time goes: `Pool(n=2).start()` and a first torch cell, by phase.

    python benchmarks/cold_start.py [runs]

Each run is a fresh interpreter (nothing imported yet), so torch and ipyparallel are imported
as in a new notebook. The phases are marked by wrapping ipyparallel's and nbdist's own steps;
the table gives each phase's end, in seconds from the start of the run, and the medians."""

from __future__ import annotations

import statistics
import subprocess
import sys

PROBE = r'''
import time
T0 = time.perf_counter()
marks = []
def mark(name):
    marks.append((name, time.perf_counter() - T0))
import ipyparallel as ipp
from nbdist.cluster import _cluster
def wrap(owner, name, label, coroutine=False):
    original = getattr(owner, name)
    if coroutine:
        async def wrapped(*args, **kwargs):
            result = await original(*args, **kwargs)
            mark(label)
            return result
    else:
        def wrapped(*args, **kwargs):
            result = original(*args, **kwargs)
            mark(label)
            return result
    setattr(owner, name, wrapped)
wrap(ipp.Cluster, "start_controller", "controller launched", coroutine=True)
wrap(ipp.Cluster, "start_engines", "engine processes launched", coroutine=True)
wrap(_cluster.EngineCluster, "_wait_for_new_engines", "engines registered")
wrap(_cluster.EngineCluster, "_adopt", "engines probed and pinned")
import nbdist
mark("nbdist imported")
pool = nbdist.Pool(n=2).start()
pool.run("import torch.distributed as dist\ndist.get_world_size()")
mark("first cell (torch imported, group formed)")
pool.stop()
for name, at in marks:
    print(f"MARK {name}\t{at:.3f}")
'''


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    table: dict[str, list[float]] = {}
    for run in range(runs):
        out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300, check=True)
        for line in out.stdout.splitlines():
            if line.startswith("MARK "):
                name, at = line[5:].split("\t")
                table.setdefault(name, []).append(float(at))
        print(f"run {run + 1}: " + ", ".join(f"{n} {v[-1]:.2f}" for n, v in table.items()), flush=True)
    print(f"\n{'phase ends at (s from start)':<45} {'median':>7}  runs")
    for name, ats in table.items():
        print(f"{name:<45} {statistics.median(ats):7.2f}  {' '.join(f'{a:.2f}' for a in ats)}")


if __name__ == "__main__":
    main()
