"""Checkpoints that survive a dead rank: written once, atomically, readable by every rank.

`save` writes on rank 0 only, into a temporary file in the same folder that is renamed
over the target (`os.replace` is atomic), so a process killed mid-write leaves the old
checkpoint intact. Every rank then meets at a barrier, so after `save` returns the file is
there for all of them. torch is imported when called (on engines), never at import.

A sharded model (FSDP, tensor parallel) is saved whole: every rank takes part in gathering
its full state before rank 0 writes it, and `restore` hands each rank back its own shard, so a
checkpoint does not depend on the number of ranks that wrote it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

FORMAT = "nbdist-checkpoint-1"


def _unwrap(model: Any) -> Any:
    from nbdist.backends.torch._model import bare_module

    return bare_module(model)


def _sharded(model: Any) -> bool:
    from torch import nn

    from nbdist.backends.torch.fsdp import is_sharded

    return isinstance(model, nn.Module) and is_sharded(model)


def _rank_and_barrier() -> tuple[int, Any]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.barrier
    return 0, lambda: None


def save(path: str | os.PathLike[str], *, model: Any = None, optimizer: Any = None, step: int | None = None,
         **extra: Any) -> Path:
    """Save model and optimizer state (DDP wrappers removed) plus `step` and any extras."""
    import torch

    target = Path(path)
    rank, barrier = _rank_and_barrier()
    model_state = optimizer_state = None
    if model is not None and _sharded(model):  # a collective: all ranks gather, rank 0 writes
        from nbdist.backends.torch.fsdp import full_optimizer_state_dict, full_state_dict

        model_state = full_state_dict(model)
        if optimizer is not None:
            optimizer_state = full_optimizer_state_dict(model, optimizer)
    elif rank == 0:
        model_state = _unwrap(model).state_dict() if model is not None else None
        optimizer_state = optimizer.state_dict() if optimizer is not None else None
    if rank == 0:
        state = {"format": FORMAT, "step": step, "model": model_state, "optimizer": optimizer_state,
                 "sharded": model is not None and _sharded(model), "extra": extra}
        target.parent.mkdir(parents=True, exist_ok=True)
        # A save killed mid-write (its engine died) left its temporary file: rank 0 is the only
        # writer of this checkpoint, so any such file now is stale.
        for stale in target.parent.glob(f".{target.name}.*.tmp"):
            stale.unlink(missing_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                torch.save(state, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    barrier()
    return target


def restore(path: str | os.PathLike[str], *, model: Any = None, optimizer: Any = None) -> int | None:
    """Load state saved by `save` into `model` / `optimizer` on this rank; return the step.

    A missing file returns None (a first run), so `start = restore(...) or 0` just works."""
    import torch

    source = Path(path)
    if not source.exists():
        return None
    device = next(_unwrap(model).parameters()).device if model is not None else "cpu"
    state = torch.load(source, map_location=device, weights_only=False)
    if state.get("format") != FORMAT:
        raise ValueError(f"{source} is not an nbdist checkpoint")
    if model is not None and _sharded(model):
        from nbdist.backends.torch.fsdp import load_full_state

        load_full_state(model, state["model"], optimizer, state["optimizer"] if optimizer is not None else None)
    elif model is not None:
        _unwrap(model).load_state_dict(state["model"])
        if optimizer is not None and state["optimizer"] is not None:
            optimizer.load_state_dict(state["optimizer"])
    elif optimizer is not None and state["optimizer"] is not None:
        optimizer.load_state_dict(state["optimizer"])
    step: int | None = state["step"]
    return step


def extras(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The extra values saved with a checkpoint (e.g. the epoch or the RNG seed)."""
    import torch

    state = torch.load(Path(path), map_location="cpu", weights_only=False)
    value: dict[str, Any] = state.get("extra", {})
    return value
