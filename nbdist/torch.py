"""PyTorch helpers for `%%distributed` cells (imported on engines only).

They read the job from `torch.distributed` and the torchrun variables, not from nbdist's
engine state alone, so the same script also runs under `torchrun`.
"""

from __future__ import annotations

import copy
import os
import time
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from nbdist import metrics

__all__ = ["device", "loader", "prepare", "unwrap"]


def device() -> torch.device:
    """This rank's device: its GPU when it has one, else the CPU."""
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def _strategy() -> str:
    from nbdist.engine import current

    return current().strategy or "ddp"


def prepare(model: nn.Module, **ddp_kwargs: Any) -> nn.Module:
    """Move the model to this rank's device and wrap it for the cell's strategy (DDP)."""
    if not dist.is_initialized():
        raise RuntimeError(
            "no process group: run this in a %%distributed cell (or under torchrun after "
            "init_process_group)"
        )
    strategy = _strategy()
    if strategy != "ddp":
        raise ValueError(f"nbdist.torch.prepare does not support strategy {strategy!r} yet")
    dev = device()
    model = model.to(dev)
    device_ids = [dev.index] if dev.type == "cuda" else None
    ddp = DistributedDataParallel(model, device_ids=device_ids, **ddp_kwargs)
    ddp.register_comm_hook(state=None, hook=_timed_allreduce)
    return ddp


def _timed_allreduce(
    state: object, bucket: dist.GradBucket
) -> torch.futures.Future[torch.Tensor]:
    """DDP's own allreduce, timed from launch to completion for the dashboard's
    compute/communication split (`comm_s` in reported records)."""
    started = time.perf_counter()
    future = default_hooks.allreduce_hook(None, bucket)  # type: ignore[arg-type]

    def done(fut: torch.futures.Future[torch.Tensor]) -> torch.Tensor:
        metrics.add_time("comm_s", time.perf_counter() - started)
        return fut.value()

    return future.then(done)


# DDP checks the hook's annotations as objects; `from __future__ import annotations` made
# them strings, so give it the real ones.
_timed_allreduce.__annotations__ = {
    "state": object, "bucket": dist.GradBucket, "return": torch.futures.Future[torch.Tensor]
}


class _EpochLoader(DataLoader):
    """A DataLoader that calls `sampler.set_epoch` on each pass, so epochs reshuffle
    the way users of `DistributedSampler` expect without the call they often forget."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.epoch = 0

    def __iter__(self) -> Any:
        sampler = self.sampler
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(self.epoch)
        self.epoch += 1
        return super().__iter__()


def loader(
    dataset: Dataset[Any],
    batch_size: int,
    *,
    shuffle: bool = True,
    seed: int = 0,
    drop_last: bool = False,
    **loader_kwargs: Any,
) -> DataLoader[Any]:
    """A DataLoader over this rank's share of `dataset` (a `DistributedSampler`)."""
    if dist.is_initialized():
        replicas, rank = dist.get_world_size(), dist.get_rank()
    else:
        replicas, rank = 1, 0
    sampler: DistributedSampler[Any] = DistributedSampler(
        dataset, num_replicas=replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last
    )
    return _EpochLoader(
        dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last, **loader_kwargs
    )


def unwrap(value: Any) -> Any:
    """A model without its DDP wrapper and on the CPU, fit to be pulled into the notebook."""
    if isinstance(value, DistributedDataParallel):
        value = value.module
    if isinstance(value, nn.Module):
        on_cpu = all(p.device.type == "cpu" for p in value.parameters())
        if not on_cpu:
            value = copy.deepcopy(value).cpu()
    return value
