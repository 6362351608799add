"""nbdistributed, driven through its magics in an IPython shell, as a notebook would.

Never calls %dist_shutdown or %dist_reset: they kill processes by name pattern, which can hit
unrelated processes. Its workers are stopped by their own PIDs."""

from __future__ import annotations

import contextlib
import io
import json
import re
import statistics
import sys
import time

from IPython.core.interactiveshell import InteractiveShell

HERE = sys.argv[1]
STEPS = int(sys.argv[2])
REPEATS = int(sys.argv[3])


def cell(ip: InteractiveShell, code: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = ip.run_cell(code)
    if not result.success:
        raise RuntimeError(out.getvalue())
    return out.getvalue()


def main() -> None:
    ip = InteractiveShell.instance()
    started = time.perf_counter()
    cell(ip, "%load_ext nbdistributed")
    cell(ip, "%dist_init -n 2")
    first = cell(ip, "%%distributed\nimport torch.distributed as dist\nprint('WORLD', dist.get_world_size())")
    cold = time.perf_counter() - started
    assert "WORLD 2" in first, first
    from nbdistributed.magic import DistributedMagic

    try:
        times = []
        for _ in range(REPEATS):
            t = time.perf_counter()
            cell(ip, "%%distributed\npass")
            times.append(time.perf_counter() - t)
        warm = statistics.median(times)
        cell(ip, f"%%distributed\nimport sys\nsys.path.insert(0, {HERE!r})\nfrom workload import train\n"
                 "import torch\ntorch.set_num_threads(1)\ntrain(steps=20)")
        out = cell(ip, f"%%distributed\nprint('STEPS_PER_S', train(steps={STEPS}))")
        rates = [float(x) for x in re.findall(r"STEPS_PER_S ([0-9.]+)", out)]
        print(json.dumps({"cold_s": cold, "warm_ms": warm * 1e3, "steps_per_s": statistics.median(rates)}))
    finally:
        manager = DistributedMagic._process_manager
        for process in getattr(manager, "processes", []):
            process.kill()  # by its own PID only
            process.wait()
        comm = DistributedMagic._comm_manager
        with contextlib.suppress(Exception):
            comm.shutdown()


if __name__ == "__main__":
    main()
