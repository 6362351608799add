"""The GPU rows, for a machine with GPUs: one engine per GPU over NCCL against torchrun with
one process per GPU, same run; prints a table.

    python benchmarks/gpu.py

The workload is `workload.py`'s DDP MLP (on a GPU a small model is bound by kernel launches
and the Python loop, which is where a notebook runner's overhead would show)."""

from __future__ import annotations

import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import nbdist_rate, pair, torchrun_rate  # noqa: E402

import nbdist  # noqa: E402
from nbdist._devices import visible_gpus  # noqa: E402


def main() -> None:
    gpus = visible_gpus(os.environ)
    if not gpus:
        raise SystemExit("no GPU visible to NVML: run this on a machine with GPUs")
    steps, rounds, dash_steps = 2000, 5, 4000
    with nbdist.Pool() as pool:
        nbdist_rate(pool, 200)  # warm: CUDA context, cuBLAS handles, NCCL communicator
        ours: list[float] = []
        theirs: list[float] = []
        on: list[float] = []
        off: list[float] = []
        for i in range(rounds):
            pair(i, lambda: theirs.append(torchrun_rate(steps, nproc=len(gpus))),
                 lambda: ours.append(nbdist_rate(pool, steps)))
            pair(i, lambda: off.append(nbdist_rate(pool, dash_steps, report=True)),
                 lambda: on.append(nbdist_rate(pool, dash_steps, report=True, dashboard=True)))
        device = pool.status()[0].device
    ours_m, theirs_m, on_m, off_m = (statistics.median(v) for v in (ours, theirs, on, off))
    import torch

    print(f"\nnbdist GPU rows: {len(gpus)} x {torch.cuda.get_device_name(0)}, torch {torch.__version__}, "
          f"engines on {device}, median of {rounds}\n")
    print("| measure | nbdist | baseline | ratio |\n| --- | --- | --- | --- |")
    print(f"| DDP MLP steps/s per rank (NCCL) | {ours_m:.1f} | torchrun --nproc_per_node={len(gpus)}: {theirs_m:.1f} "
          f"| {ours_m / theirs_m:.3f}x |")
    print(f"| report() every step, dashboard on vs off | {on_m:.1f} | off: {off_m:.1f} | {on_m / off_m:.3f}x |")


if __name__ == "__main__":
    main()
