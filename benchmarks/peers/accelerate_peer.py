"""Accelerate's notebook_launcher: it starts fresh worker processes on every call."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

HERE = sys.argv[1]
STEPS = int(sys.argv[2])
sys.path.insert(0, HERE)


def form_group() -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    dist.barrier()
    dist.destroy_process_group()


def train_and_record(path: str, steps: int) -> None:
    import torch
    import torch.distributed as dist
    from workload import train

    torch.set_num_threads(1)
    rate = train(steps=steps)
    if dist.get_rank() == 0:
        with open(path, "w") as handle:
            handle.write(str(rate))
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    import socket

    started = time.perf_counter()  # the notebook's import of accelerate (and torch) is part of the cold start
    from accelerate import notebook_launcher

    def port() -> str:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return str(sock.getsockname()[1])

    notebook_launcher(form_group, num_processes=2, use_port=port())
    cold = time.perf_counter() - started
    record = os.path.join(tempfile.mkdtemp(), "rate")
    started = time.perf_counter()
    notebook_launcher(train_and_record, args=(record, 50), num_processes=2, use_port=port())
    rerun = time.perf_counter() - started
    notebook_launcher(train_and_record, args=(record, STEPS), num_processes=2, use_port=port())
    with open(record) as handle:
        rate = float(handle.read())
    print(json.dumps({"cold_s": cold, "rerun_s": rerun, "steps_per_s": rate}))


if __name__ == "__main__":
    main()
