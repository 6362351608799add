"""The one answer to "which device is this rank's?" (engines and torchrun workers).

An nbdist engine that owns GPUs sees only them (the kernel set its `CUDA_VISIBLE_DEVICES`
before torch could touch CUDA), so its device is always `cuda:0`, whether it owns one GPU or
several (`--gpus-per-engine 2`: `0,1`, and MirroredStrategy-style code uses the rest). A worker
that torchrun started sees every GPU of the host, so its device is `cuda:LOCAL_RANK`.
"""

from __future__ import annotations

import os
from typing import Any

import torch

NOT_AN_ENGINE = "torchrun"


def device_index(assigned: str | None, visible: int, local_rank: int) -> int | None:
    """The CUDA index for this rank, or None for the CPU.

    `assigned` is the engine's GPU list as nbdist set it (`"0,1"`; None for a CPU engine) or
    `NOT_AN_ENGINE` outside nbdist; `visible` is how many GPUs torch sees here."""
    if visible == 0:
        return None
    if assigned == NOT_AN_ENGINE:
        return local_rank % visible
    return None if assigned is None else 0


def rank_device() -> torch.device:
    from nbdist.engine import current

    info = current().info
    assigned = NOT_AN_ENGINE if info is None else info.gpu
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = device_index(assigned, visible, int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu") if index is None else torch.device("cuda", index)


def mesh() -> Any:
    """A one-dimensional device mesh over every rank (FSDP and tensor parallelism)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(rank_device().type, (dist.get_world_size(),))
