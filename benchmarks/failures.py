"""How each failure ends, measured on a real 2-engine pool: seconds until the cell ends, whether
engine state was kept, and the first line of what the user is told.

    python benchmarks/failures.py          # about a minute on 2 cores
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from typing import Any

import nbdist

SCENARIOS: list[tuple[str, str, dict[str, Any]]] = [
    ("rank 1 raises, rank 0 waits in all_reduce",
     "import torch, torch.distributed as dist\nif rank == 1:\n    raise ValueError('bad batch')\n"
     "dist.all_reduce(torch.ones(1))", {}),
    ("rank 1 raises, rank 0 still computing (4 s)",
     "import time\nif rank == 1:\n    raise ValueError('bad batch')\nfor _ in range(40):\n    time.sleep(0.1)", {}),
    ("ranks raise different errors", "if rank == 0:\n    raise ValueError('v')\nraise TypeError('t')", {}),
    ("engine killed (SIGKILL) in a barrier",
     "import os, torch.distributed as dist\nif rank == 1:\n    os.kill(os.getpid(), 9)\ndist.barrier()", {}),
    ("--timeout 1 in Python code", "import time\ntime.sleep(600)", {"timeout": 1.0}),
    ("--timeout 1 in a collective",
     "import time, torch.distributed as dist\nif rank == 0:\n    dist.barrier()\nelse:\n    time.sleep(600)",
     {"timeout": 1.0}),
    ("syntax error", "x = (1,\ny = 2", {}),
    ("last value the notebook cannot load", "import sys\nsys.flags", {}),
]


def measure(pool: nbdist.Pool, source: str, options: dict[str, Any]) -> tuple[float, str, str]:
    started = time.monotonic()
    try:
        result = pool.run(source, **options)
        return time.monotonic() - started, "kept", f"value: {result.value!r}"[:110]
    except nbdist.NbdistError as exc:
        seconds = time.monotonic() - started
        lost = getattr(exc, "lost_state", False)
        return seconds, "LOST" if lost else "kept", str(exc).splitlines()[0][:110]


def interrupted(pool: nbdist.Pool) -> tuple[float, str, str]:
    main = threading.get_ident()
    threading.Timer(1.0, lambda: signal.pthread_kill(main, signal.SIGINT)).start()
    seconds, state, message = measure(pool, "import time\nfor _ in range(600):\n    time.sleep(0.1)", {})
    return seconds - 1.0, state, message


def main() -> None:
    rows = []
    with nbdist.Pool(n=2, gpus="none") as pool:
        pool.run("1")
        for name, source, options in SCENARIOS:
            rows.append((name, *measure(pool, source, options)))
        rows.append(("kernel interrupt after 1 s", *interrupted(pool)))
        pull_started = time.monotonic()
        pool.run("import sys\nflags = sys.flags")
        try:
            pool.pull("flags")
            pulled = "pulled"
        except nbdist.NbdistError as exc:
            pulled = str(exc)[:110]
        rows.append(("%nbdist pull of sys.flags", time.monotonic() - pull_started, "kept", pulled))
    print(f"{'failure':46} {'s to end':>8}  {'state':5}  message (first line)")
    for name, seconds, state, message in rows:
        print(f"{name:46} {seconds:8.2f}  {state:5}  {message}")


if __name__ == "__main__":
    sys.exit(main())
