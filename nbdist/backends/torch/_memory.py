"""Model-state memory a rank holds: what sharding is meant to shrink (engines only)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from nbdist.backends.torch.pipeline import Pipeline


def _local_bytes(tensor: torch.Tensor) -> int:
    from torch.distributed.tensor import DTensor

    local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    return local.numel() * local.element_size()


def memory(namespace: dict[str, Any]) -> dict[str, float]:
    """Parameter, gradient and optimizer-state MB this rank holds, over the modules and
    optimizers in `namespace` (each tensor counted once): what sharding is meant to shrink."""
    seen: set[int] = set()
    params = grads = optim = 0
    for value in list(namespace.values()):
        if isinstance(value, nn.Module) or isinstance(value, Pipeline):
            for p in value.parameters():
                if id(p) in seen:
                    continue
                seen.add(id(p))
                params += _local_bytes(p)
                if p.grad is not None:
                    grads += _local_bytes(p.grad)
        elif isinstance(value, torch.optim.Optimizer):
            for state in value.state.values():
                for t in state.values():
                    if isinstance(t, torch.Tensor) and id(t) not in seen:
                        seen.add(id(t))
                        optim += _local_bytes(t)
    mb = 2.0**20
    return {"param_mb": params / mb, "grad_mb": grads / mb, "optim_mb": optim / mb}
