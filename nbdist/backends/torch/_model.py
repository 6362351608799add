"""A model without the wrappers parallelism put around it (engines only)."""

from __future__ import annotations

from typing import Any

from torch.nn.parallel import DistributedDataParallel

from nbdist.backends.torch.pipeline import Pipeline


def bare_module(value: Any) -> Any:
    """The user's module inside a DDP wrapper or a pipeline stage (this rank's stage); other
    values as they are. Sharded parameters stay sharded: see `fsdp.plain_copy`."""
    if isinstance(value, Pipeline):
        value = value.module
    if isinstance(value, DistributedDataParallel):
        value = value.module
    return value
