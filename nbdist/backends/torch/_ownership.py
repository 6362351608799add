"""A cell's own `init_process_group` and `destroy_process_group`, as scripts written for
torchrun call them, made to work in a pool whose group nbdist formed when it started.

The pool's group is formed once per engine life and is never re-formed: creating and
destroying gloo groups repeatedly, even on fresh ports, hangs torch itself within two or three
cycles. So a cell's `init_process_group` joins the group that exists when it asks for what
that group is (its backend, world size and rank), and says plainly what cannot be met
otherwise; a cell's `destroy_process_group()` of the default group leaves it in place, so the
next cell, and the next `init_process_group`, find a working group every time. Groups a cell
makes itself (`new_group`) are the cell's, and are destroyed as asked.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d

_MARK = "_nbdist_keeps_the_pool_group"


def _kinds(backend: Any) -> set[str]:
    """The backends a request names: `"nccl"`, `"cpu:gloo,cuda:nccl"`, `Backend.GLOO`, None."""
    if backend is None:
        return set()
    text = str(backend).lower()
    return {part.rpartition(":")[2].strip() for part in text.split(",") if part.strip()}


def check_request(backend: Any, world_size: int, rank: int, have_backend: str, have_world: int,
                  have_rank: int, gpu: bool) -> None:
    """Raise the error a user should read when a cell's `init_process_group` asks for a group
    other than the pool's; return when joining the pool's group gives what was asked."""
    wanted = _kinds(backend)
    have = _kinds(have_backend)
    if "nccl" in wanted and not gpu:
        raise RuntimeError(
            "init_process_group asks for the 'nccl' backend, which needs a GPU per rank, but this pool's engines run "
            "on the CPU (their group uses gloo). Use backend='gloo' (or leave the backend out: the pool's group is "
            "already formed), or start GPU engines with `%nbdist start --gpus all` on a machine with GPUs."
        )
    unknown = wanted - have - {"gloo", "nccl", "undefined"}
    if unknown:
        raise RuntimeError(
            f"init_process_group asks for the {', '.join(sorted(unknown))!r} backend; this pool's group uses "
            f"{have_backend}. Leave the backend out (or use {have_backend!r}) to use the pool's group."
        )
    if world_size not in (-1, None) and world_size != have_world:
        raise ValueError(
            f"init_process_group asks for world_size={world_size}, but the pool has {have_world} ranks. Pass "
            f"world_size=int(os.environ['WORLD_SIZE']) (it is {have_world}), or start a pool of {world_size} engines."
        )
    if rank not in (-1, None) and rank != have_rank:
        raise ValueError(
            f"init_process_group asks for rank={rank} on the engine of rank {have_rank}. Pass "
            "rank=int(os.environ['RANK']) (each engine has its own), as torchrun scripts do."
        )


def keep_pool_group(gpu: bool) -> None:
    """Put the pool-aware versions in front of torch's (once per engine)."""
    if getattr(dist.init_process_group, _MARK, False):
        return
    original_init = c10d.init_process_group
    original_destroy = c10d.destroy_process_group

    def init_process_group(backend: Any = None, init_method: str | None = None, timeout: timedelta | None = None,
                           world_size: int = -1, rank: int = -1, *args: Any, **kwargs: Any) -> None:
        if not dist.is_initialized():
            return original_init(backend, init_method, timeout, world_size, rank, *args, **kwargs)
        check_request(backend, world_size, rank, str(dist.get_backend()), dist.get_world_size(), dist.get_rank(),
                      gpu)
        return None

    def destroy_process_group(group: Any = None) -> None:
        if group is None or group is c10d.GroupMember.WORLD:
            return None  # the pool's group: kept for the next cell (see the module's docstring)
        return original_destroy(group)

    for fn in (init_process_group, destroy_process_group):
        setattr(fn, _MARK, True)
        fn.__doc__ = getattr(original_init if fn is init_process_group else original_destroy, "__doc__", None)
    for module in (dist, c10d):
        setattr(module, "init_process_group", init_process_group)  # noqa: B010 - mypy sees no such attribute
        setattr(module, "destroy_process_group", destroy_process_group)  # noqa: B010
