"""One DDP training workload, run unchanged by torchrun and by a `%%distributed` cell."""

from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


def _device() -> torch.device:
    """The rank's GPU where it has one (torchrun: by LOCAL_RANK; an nbdist engine sees only its own)."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


def train(steps: int = 300, warmup: int = 30, report: bool = False, width: int = 512) -> float:
    """Return steps per second of this rank over `steps` timed steps."""
    dev = _device()
    if not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    torch.manual_seed(0)
    model = DistributedDataParallel(
        nn.Sequential(nn.Linear(256, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                      nn.Linear(width, 10)).to(dev),
        device_ids=[dev.index] if dev.type == "cuda" else None,
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(64, 256, device=dev)
    y = torch.randint(0, 10, (64,), device=dev)
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
    if dev.type == "cuda":
        torch.cuda.synchronize()  # the GPU may still be working through queued steps
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
