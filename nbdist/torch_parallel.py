"""Model parallelism for `%%distributed --strategy fsdp|pipeline|tensor` (engines only).

Thin layers over torch's own: FSDP2 `fully_shard`, `torch.distributed.pipelining` and DTensor
tensor parallelism. They exist so a cell needs no mesh, stage or plan boilerplate, and so a
sharded model still comes back whole to the notebook (`%nbdist pull`) and to checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


def _mesh() -> Any:
    from torch.distributed.device_mesh import init_device_mesh

    from nbdist.torch import device

    return init_device_mesh(device().type, (dist.get_world_size(),))


# -- FSDP -------------------------------------------------------------------------------------


def shard(model: nn.Module, layers: type[nn.Module] | tuple[type[nn.Module], ...] | None = None) -> nn.Module:
    """Shard parameters, gradients and optimizer state across ranks with FSDP2 `fully_shard`.

    `layers`: module types to shard one by one (each gathered only while it runs, which is
    what saves memory); by default every child of the root that holds parameters."""
    from torch.distributed.fsdp import fully_shard

    from nbdist.torch import device

    model = model.to(device())
    mesh = _mesh()
    if layers is None:
        units = [child for child in model.children() if any(True for _ in child.parameters())]
    else:
        units = [m for m in model.modules() if isinstance(m, layers) and m is not model]
    for unit in units:
        fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def full_state_dict(model: nn.Module, everywhere: bool = False) -> dict[str, Any]:
    """The whole model's state on the CPU. A collective: every rank must call it. Only rank 0
    receives it (others get an empty dict) unless `everywhere`."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state: dict[str, Any] = get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=not everywhere)
    )
    return {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in state.items()}


def full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    state: dict[str, Any] = get_optimizer_state_dict(
        model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    return state


def load_full_state(model: nn.Module, model_state: dict[str, Any], optimizer: torch.optim.Optimizer | None = None,
                    optimizer_state: dict[str, Any] | None = None) -> None:
    """Load full (unsharded) state into a sharded model; each rank keeps its own shard."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_state, options=options)
    if optimizer is not None and optimizer_state is not None:
        set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)


_HOOKS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
          "_forward_pre_hooks_with_kwargs", "_backward_pre_hooks", "_backward_hooks", "_state_dict_hooks",
          "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")
_STATE_PREFIX = "__composable_api_state_key"


def plain_copy(model: nn.Module) -> nn.Module:
    """A plain, unsharded CPU copy of a sharded model (a collective), for the notebook.

    FSDP refuses `deepcopy`, so the copy is rebuilt module by module, leaving out what
    sharding added (DTensor shards, the FSDP state that holds the process group, hooks),
    then filled with the gathered full state."""
    state = full_state_dict(model, everywhere=True)
    clone = _plain_module(model, {})
    clone.load_state_dict(state)
    return clone


def _plain_module(module: nn.Module, memo: dict[int, Any]) -> nn.Module:
    import copy
    from collections import OrderedDict

    from torch.distributed.fsdp import FSDPModule

    cls = next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule))  # FSDP<Class> -> Class
    clone: nn.Module = cls.__new__(cls)  # type: ignore[assignment]
    for key, value in module.__dict__.items():
        if key.startswith(_STATE_PREFIX) or key in ("_is_fsdp_managed_module", "_fsdp_use_orig_params"):
            continue
        if key in _HOOKS:
            copied: Any = OrderedDict()
        elif key == "_parameters":
            copied = {name: None if p is None else nn.Parameter(torch.empty(p.shape, dtype=p.dtype),
                                                                 requires_grad=p.requires_grad)
                      for name, p in value.items()}
        elif key == "_buffers":
            copied = {name: None if b is None else torch.empty(b.shape, dtype=b.dtype) for name, b in value.items()}
        elif key == "_modules":
            copied = {name: None if m is None else _plain_module(m, memo) for name, m in value.items()}
        else:
            copied = copy.deepcopy(value, memo)
        clone.__dict__[key] = copied
    return clone


# -- pipeline ---------------------------------------------------------------------------------


def split_sequential(model: nn.Sequential, stages: int, split: Sequence[int] | None = None) -> list[nn.Module]:
    """Cut a Sequential into `stages` consecutive pieces, at `split` indices or evenly."""
    children = list(model.children())
    if split is None:
        per, extra = divmod(len(children), stages)
        bounds, start = [], 0
        for i in range(stages):
            start += per + (1 if i < extra else 0)
            bounds.append(start)
        split = bounds[:-1]
    edges = [0, *split, len(children)]
    if len(edges) != stages + 1 or any(b <= a for a, b in zip(edges, edges[1:], strict=False)):
        raise ValueError(f"split {list(split)} does not cut {len(children)} layers into {stages} non-empty stages")
    return [nn.Sequential(*children[a:b]) for a, b in zip(edges, edges[1:], strict=False)]


class Pipeline:
    """This rank's stage of a pipeline-parallel model, and its schedule.

    `step(x, y)` runs one training step over `microbatches` micro-batches: rank 0 feeds `x`,
    the last rank computes `loss_fn(output, y)`; every rank must call it. It returns the mean
    micro-batch loss on the last stage (reported to the dashboard) and None elsewhere."""

    SCHEDULES = ("gpipe", "1f1b")

    def __init__(self, stage_module: nn.Module, *, microbatches: int, schedule: str,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        from nbdist.torch import device

        if schedule not in self.SCHEDULES:
            raise ValueError(f"schedule {schedule!r} is not known: choose one of {', '.join(self.SCHEDULES)}")
        self.rank, self.stages = dist.get_rank(), dist.get_world_size()
        self.module = stage_module.to(device())
        self.stage = PipelineStage(self.module, self.rank, self.stages, device())
        kind = ScheduleGPipe if schedule == "gpipe" else Schedule1F1B
        self.schedule = kind(self.stage, n_microbatches=microbatches, loss_fn=loss_fn)
        self.microbatches = microbatches

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    @property
    def is_last(self) -> bool:
        return self.rank == self.stages - 1

    def parameters(self) -> Any:
        return self.module.parameters()

    def step(self, x: torch.Tensor | None = None, target: torch.Tensor | None = None) -> float | None:
        losses: list[torch.Tensor] = []
        if self.is_first:
            self.schedule.step(x, target=target if self.is_last else None, losses=losses)
        elif self.is_last:
            self.schedule.step(target=target, losses=losses)
        else:
            self.schedule.step()
        if not losses:
            return None
        return float(torch.stack([loss.detach() for loss in losses]).mean())


def pipeline(model: nn.Module | Sequence[nn.Module], *, microbatches: int = 4, schedule: str = "gpipe",
             loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
             split: Sequence[int] | None = None) -> Pipeline:
    """Split `model` into one stage per rank (or take a list of stage modules) and pipeline it."""
    stages = dist.get_world_size()
    if isinstance(model, nn.Sequential):
        pieces = split_sequential(model, stages, split)
    elif isinstance(model, nn.Module):
        raise TypeError("a pipeline needs an nn.Sequential to split, or a list of one stage module per rank")
    else:
        pieces = list(model)
        if len(pieces) != stages:
            raise ValueError(f"{len(pieces)} stage modules for {stages} ranks: give one stage per rank")
    return Pipeline(pieces[dist.get_rank()], microbatches=microbatches, schedule=schedule,
                    loss_fn=loss_fn or nn.functional.cross_entropy)


# -- tensor parallel --------------------------------------------------------------------------


def mlp_plan(model: nn.Module) -> dict[str, Any]:
    """Megatron-style plan for consecutive Linear layers: column-wise then row-wise, in pairs,
    so each pair needs one all-reduce in forward and one in backward."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if len(linears) % 2:
        linears = linears[:-1]  # an odd last Linear stays replicated
    return {name: (ColwiseParallel() if i % 2 == 0 else RowwiseParallel()) for i, name in enumerate(linears)}


def attention_plan(q: str = "q_proj", k: str = "k_proj", v: str = "v_proj", out: str = "out_proj") -> dict[str, Any]:
    """Plan for an attention block with separate q/k/v/out Linear layers: heads split across
    ranks (q, k, v column-wise, out row-wise). The block must compute its head count from the
    local q width (`q.out_features // head_dim`), as in most implementations."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    return {q: ColwiseParallel(), k: ColwiseParallel(), v: ColwiseParallel(), out: RowwiseParallel()}


def tensor_parallel(model: nn.Module, plan: dict[str, Any] | None = None) -> nn.Module:
    """Split the layers named in `plan` (default: `mlp_plan(model)`) across ranks with DTensor."""
    from torch.distributed.tensor.parallel import parallelize_module

    from nbdist.torch import device

    model = model.to(device())
    return parallelize_module(model, _mesh(), plan if plan is not None else mlp_plan(model))


# -- memory -----------------------------------------------------------------------------------


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
