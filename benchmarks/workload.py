"""One DDP training workload, run unchanged by torchrun and by a `%%distributed` cell."""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


def train(steps: int = 300, warmup: int = 30, report: bool = False, width: int = 512) -> float:
    """Return steps per second of this rank over `steps` timed steps."""
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = DistributedDataParallel(
        nn.Sequential(nn.Linear(256, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(64, 256)
    y = torch.randint(0, 10, (64,))
    if report:
        import nbdist
    started = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            dist.barrier()
            started = time.perf_counter()
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if report:
            nbdist.report(step=step, loss=loss.item(), samples=64)
    elapsed = time.perf_counter() - started
    return steps / elapsed


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    rate = train(steps=parser.parse_args().steps)
    if dist.get_rank() == 0:
        print(f"STEPS_PER_S {rate:.3f}", flush=True)
    dist.barrier()  # both ranks done before teardown: gloo aborted at exit without it, now and then
    dist.destroy_process_group()
