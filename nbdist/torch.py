"""PyTorch helpers for `%%distributed` cells (imported on engines only).

They read the job from `torch.distributed` and the torchrun variables, not from nbdist's
engine state alone, so the same script also runs under `torchrun`.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from nbdist.backends.torch import ddp, fsdp
from nbdist.backends.torch import pipeline as _pipeline
from nbdist.backends.torch import tensor as _tensor
from nbdist.backends.torch._device import rank_device
from nbdist.backends.torch._model import bare_module
from nbdist.backends.torch._strategy import TorchStrategy

__all__ = [
    "Pipeline", "attention_plan", "autocast", "device", "loader", "mlp_plan", "pipeline", "prepare", "shard",
    "sync_batchnorm", "tensor_parallel", "unwrap",
]


def device() -> torch.device:
    """This rank's device: its GPU when it has one, else the CPU (the same answer the
    cell's `device` gives, in an nbdist engine and under torchrun alike)."""
    return rank_device()


def _strategy() -> TorchStrategy:
    from nbdist.engine import current

    strategy = current().strategy
    return strategy if isinstance(strategy, TorchStrategy) else ddp.DDP()


def prepare(model: nn.Module, **options: Any) -> Any:
    """Place the model on this rank's device and parallelise it the way the cell's
    `--strategy` says: `ddp` (DistributedDataParallel, options go to it), `fsdp` (sharded
    with FSDP2; `layers=` picks the module types sharded one by one), `tensor` (DTensor
    tensor parallelism; `plan=`, default `mlp_plan`), `pipeline` (one stage per rank, see
    `pipeline`: `microbatches=`, `schedule=`, `loss_fn=`, `split=`)."""
    if not dist.is_initialized():
        raise RuntimeError(
            "no process group: run this in a %%distributed cell (or under torchrun after "
            "init_process_group)"
        )
    return _strategy().prepare(model, **options)


# The model-parallel helpers, also callable directly (e.g. `nbdist.torch.pipeline(...)` in a
# cell whose strategy is ddp, to compare).
shard = fsdp.shard
pipeline = _pipeline.pipeline
tensor_parallel = _tensor.tensor_parallel
mlp_plan = _tensor.mlp_plan
attention_plan = _tensor.attention_plan
Pipeline = _pipeline.Pipeline


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
    """A model without its DDP wrapper and on the CPU, fit to be pulled into the notebook.

    A sharded model (FSDP, tensor parallel) comes back whole; gathering it is a collective,
    so every rank must call this together (`%nbdist pull` arranges that)."""
    value = bare_module(value)  # a pipeline gives this rank's stage
    if isinstance(value, nn.Module) and fsdp.is_sharded(value):
        return fsdp.plain_copy(value)
    if isinstance(value, nn.Module):
        on_cpu = all(p.device.type == "cpu" for p in value.parameters())
        if not on_cpu:
            value = copy.deepcopy(value).cpu()
        if any(isinstance(m, _GroupBatchNorm) for m in value.modules()):
            value = _plain_batchnorm(value if not on_cpu else copy.deepcopy(value))
    return value


def _plain_batchnorm(module: nn.Module) -> nn.Module:
    """The model with each all-reducing batch norm back as the plain layer it replaced (in
    place: called on a copy), so a pulled model runs in one process without nbdist."""
    if isinstance(module, _GroupBatchNorm):
        plain = module.plain_type(module.num_features, module.eps, module.momentum, module.affine,
                                  module.track_running_stats)
        plain.load_state_dict(module.state_dict())
        plain.train(module.training)
        return plain
    for name, child in module.named_children():
        module.add_module(name, _plain_batchnorm(child))
    return module


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks, differentiably: the gradient of a global sum is the global sum of the
    gradients, so backward all-reduces too (each rank then gets its inputs' true gradient)."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        out = grad.clone()
        dist.all_reduce(out)
        return out


class _GroupBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm over the global batch for CPU (gloo) ranks, where torch's `SyncBatchNorm`
    refuses to run: per-channel sum, sum of squares and count are all-reduced with autograd
    (so the backward pass is synchronised too), then the batch is normalised with them."""

    plain_type: type[nn.modules.batchnorm._BatchNorm] = nn.BatchNorm2d
    """The layer it replaced, given back when the model is pulled."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        if not self.training or not dist.is_initialized() or dist.get_world_size() == 1:
            return super().forward(input)
        channels = input.size(1)
        dims = [0, *range(2, input.dim())]
        count = torch.full((1,), input.numel() / channels, dtype=input.dtype, device=input.device)
        totals = _AllReduceSum.apply(torch.cat([input.sum(dims), (input * input).sum(dims), count]))
        n = totals[-1]
        mean = totals[:channels] / n
        var = totals[channels:2 * channels] / n - mean * mean
        tracked = self.num_batches_tracked
        if self.running_mean is not None and self.running_var is not None and tracked is not None:
            with torch.no_grad():
                tracked.add_(1)
                momentum = self.momentum if self.momentum is not None else 1.0 / float(tracked)
                self.running_mean.mul_(1 - momentum).add_(momentum * mean.detach())
                self.running_var.mul_(1 - momentum).add_(momentum * var.detach() * n / (n - 1))
        shape = [1, channels] + [1] * (input.dim() - 2)
        out = (input - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out


def sync_batchnorm(module: nn.Module) -> nn.Module:
    """Make every BatchNorm layer normalise with the statistics of the global batch.

    On GPUs this is torch's `SyncBatchNorm`; on CPU ranks (where that refuses to run) an
    equivalent that all-reduces the statistics over gloo. Call it before `prepare`."""
    if device().type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, _GroupBatchNorm):
        converted = _GroupBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                    module.track_running_stats)
        if not isinstance(module, nn.SyncBatchNorm):
            converted.plain_type = type(module)
        if module.affine:
            with torch.no_grad():
                converted.weight.copy_(module.weight)
                converted.bias.copy_(module.bias)
        if module.track_running_stats:
            converted.running_mean = module.running_mean
            converted.running_var = module.running_var
            converted.num_batches_tracked = module.num_batches_tracked
        converted.train(module.training)
        return converted
    for name, child in module.named_children():
        module.add_module(name, sync_batchnorm(child))
    return module


def autocast(enabled: bool = True) -> Any:
    """Mixed precision where this rank's device supports it: float16 autocast on CUDA GPUs
    (bfloat16 where the GPU has it), bfloat16 on CPUs. Use with a gradient scaler for float16."""
    dev = device()
    if dev.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        dtype = torch.bfloat16
    return torch.autocast(device_type=dev.type, dtype=dtype, enabled=enabled)
