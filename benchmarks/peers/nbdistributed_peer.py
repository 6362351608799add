"""nbdistributed, driven through its magics in an IPython shell, as a notebook would.

Never calls %dist_shutdown or %dist_reset: they kill processes by name pattern, which can hit
unrelated processes. Its workers are stopped by their own PIDs."""

from __future__ import annotations

import contextlib
import io
import json
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


def ready(magic: object, deadline: float) -> None:
    """Wait until every worker answers: a cell sent before the workers connect is lost
    (its 30 s timeout would be charged to the peer's cold start otherwise)."""
    comm = magic._comm_manager  # type: ignore[attr-defined]
    while True:
        try:
            comm.send_to_all("get_status", None, timeout=0.2)
            return
        except Exception:
            if time.perf_counter() > deadline:
                raise


def get(magic: object, name: str) -> list[dict]:
    """A variable from every worker, through nbdistributed's own request (its printed output
    is streamed by a thread and arrives after the cell returns)."""
    responses = magic._comm_manager.send_to_all("get_var", name)  # type: ignore[attr-defined]
    return [responses[r] for r in sorted(responses)]


def main() -> None:
    ip = InteractiveShell.instance()
    started = time.perf_counter()
    cell(ip, "%load_ext nbdistributed")
    magic = ip.magics_manager.registry["DistributedMagic"]
    try:
        cell(ip, "%dist_init -n 2")
        ready(magic, started + 120)
        cell(ip, "%%distributed\nimport torch.distributed as dist\nworld = dist.get_world_size()")
        cold = time.perf_counter() - started
        assert [r["value"] for r in get(magic, "world")] == [2, 2]
        times = []
        for _ in range(REPEATS):
            t = time.perf_counter()
            cell(ip, "%%distributed\npass")
            times.append(time.perf_counter() - t)
        warm = statistics.median(times)
        cell(ip, f"%%distributed\nimport sys\nsys.path.insert(0, {HERE!r})\nfrom workload import train\n"
                 "import torch\ntorch.set_num_threads(1)\ntrain(steps=20)")
        cell(ip, f"%%distributed\nrate = train(steps={STEPS})")
        rates = [float(r["value"]) for r in get(magic, "rate")]
        print(json.dumps({"cold_s": cold, "warm_ms": warm * 1e3, "steps_per_s": statistics.median(rates)}))
    finally:
        manager = magic._process_manager
        for process in getattr(manager, "processes", None) or []:
            process.kill()  # by its own PID only
            process.wait()
        with contextlib.suppress(Exception):
            magic._comm_manager.shutdown()


if __name__ == "__main__":
    main()
