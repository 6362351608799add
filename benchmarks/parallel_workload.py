"""One model-parallel workload per strategy (fsdp, pipeline, tensor), run unchanged by torchrun
and by a `%%distributed` cell. It calls nbdist's helpers explicitly, which work under torchrun."""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
from torch import nn

import nbdist.torch as nbt
from nbdist.backends.torch._memory import memory


def build(width: int = 512) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def _reset_peak_rss() -> None:
    """Restart the kernel's RSS high-water mark (Linux): a long-lived engine's lifetime peak
    would say nothing about this run."""
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")


def train(strategy: str, steps: int = 100, warmup: int = 10) -> tuple[float, float, float]:
    """Return (steps/s of this rank, parameter+gradient+optimizer MB this rank holds, the rank's
    peak RSS during this run in MB). The whole process's peak, not its rise: a warm engine reuses
    memory that earlier cells freed, so a rise would flatter it against a fresh torchrun process."""
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    torch.set_num_threads(1)
    _reset_peak_rss()
    x, y = torch.randn(64, 256), torch.randint(0, 10, (64,))
    pipe = None
    if strategy == "fsdp":
        model: nn.Module = nbt.shard(build())
        params = model.parameters()
    elif strategy == "tensor":
        model = nbt.tensor_parallel(build())
        params = model.parameters()
    elif strategy == "pipeline":
        pipe = nbt.pipeline(build(), microbatches=4, schedule="1f1b")
        model = pipe.module
        params = pipe.parameters()
    else:
        raise ValueError(strategy)
    opt = torch.optim.Adam(params, lr=1e-3)
    started = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            dist.barrier()
            started = time.perf_counter()
        opt.zero_grad()
        if pipe is not None:
            pipe.step(x if pipe.is_first else None, y if pipe.is_last else None)
        else:
            nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    rate = steps / (time.perf_counter() - started)
    held = memory({"model": model, "opt": opt})
    return rate, held["param_mb"] + held["grad_mb"] + held["optim_mb"], _status_mb("VmHWM")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--strategy", required=True)
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    rate, mb, peak = train(args.strategy, steps=args.steps)
    if dist.get_rank() == 0:
        print(f"STEPS_PER_S {rate:.3f} MODEL_MB {mb:.3f} PEAK_MB {peak:.3f}", flush=True)
    dist.barrier()
    dist.destroy_process_group()
