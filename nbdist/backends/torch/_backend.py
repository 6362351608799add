"""The PyTorch backend on an engine: one `torch.distributed` process group for the engine's life."""

from __future__ import annotations

import os
from contextlib import AbstractContextManager
from typing import Any

import torch
import torch.distributed as dist

from nbdist._net import loopback_interface
from nbdist._wire import Formation, RankInfo
from nbdist.backends._base import Backend
from nbdist.backends.torch._device import rank_device
from nbdist.backends.torch._ownership import keep_pool_group


def _sync_batchnorm_on_cpu() -> None:
    """`nn.SyncBatchNorm.convert_sync_batchnorm(model)`, as scripts call it, gives layers that
    refuse to run on CPU ranks ("SyncBatchNorm expected input tensor to be on GPU"); on CPU
    engines it gives nbdist's equivalent over gloo instead (`nbdist.torch.sync_batchnorm`)."""
    original = torch.nn.SyncBatchNorm.convert_sync_batchnorm

    def convert_sync_batchnorm(cls: Any, module: torch.nn.Module, process_group: Any = None) -> torch.nn.Module:
        if process_group is not None:  # a subgroup: only torch's own layer takes one
            return original(module, process_group)
        from nbdist.torch import sync_batchnorm

        return sync_batchnorm(module)

    torch.nn.SyncBatchNorm.convert_sync_batchnorm = classmethod(convert_sync_batchnorm)  # type: ignore[assignment]


class TorchBackend(Backend):
    name = "torch"

    def setup(self, info: RankInfo, formation: Formation) -> None:
        os.environ.update(info.torchrun_env())
        torch.set_num_threads(info.threads)
        device = rank_device()
        keep_pool_group(gpu=device.type == "cuda")
        if device.type == "cpu":
            _sync_batchnorm_on_cpu()
        if dist.is_initialized():
            return
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if info.store is not None:
            # One machine: the ranks meet through a file, since torch's TCP store listens on every
            # interface whatever address it is given; gloo's own sockets stay on loopback.
            os.environ.setdefault("GLOO_SOCKET_IFNAME", loopback_interface())
            init_method = f"file://{info.store}"
        else:
            init_method = f"tcp://{info.master_addr}:{info.master_port}"
        dist.init_process_group(
            # On GPUs gloo serves CPU tensors beside NCCL, so a script's gloo collectives work too.
            backend="cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo",
            init_method=init_method,
            rank=info.rank,
            world_size=info.world_size,
        )

    def namespace(self, info: RankInfo) -> dict[str, Any]:
        return {"device": rank_device()}

    def export(self, value: Any) -> Any:
        from nbdist.torch import unwrap

        return unwrap(value)

    def export_is_collective(self, value: Any) -> bool:
        from nbdist.backends.torch.fsdp import is_sharded

        return isinstance(value, torch.nn.Module) and is_sharded(value)

    def memory(self, namespace: dict[str, Any]) -> dict[str, float]:
        from nbdist.backends.torch._memory import memory

        return memory(namespace)

    def only_ranks(self, ranks: tuple[int, ...]) -> AbstractContextManager[None]:
        from nbdist.backends.torch._subset import only_ranks

        return only_ranks(ranks)

    def describe_device(self, info: RankInfo) -> str:
        return f"cuda:{info.gpu}" if info.gpu is not None else f"cpu ({info.threads} threads)"
