"""PyTorch backend: one `torch.distributed` process group for the engine's whole life."""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

from nbdist.backends.base import Backend, Formation, RankInfo


class TorchBackend(Backend):
    name = "torch"

    def setup(self, info: RankInfo, formation: Formation) -> None:
        os.environ.update(info.torchrun_env())
        torch.set_num_threads(info.threads)
        if dist.is_initialized():
            return
        use_cuda = info.gpu is not None and torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(self._device(info))
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            init_method=f"tcp://{info.master_addr}:{info.master_port}",
            rank=info.rank,
            world_size=info.world_size,
        )

    def _device(self, info: RankInfo) -> torch.device:
        if info.gpu is not None and torch.cuda.is_available():
            # The engine sees only its own GPU (CUDA_VISIBLE_DEVICES), so it is always index 0.
            return torch.device("cuda", 0)
        return torch.device("cpu")

    def namespace(self, info: RankInfo) -> dict[str, Any]:
        return {"device": self._device(info)}

    def export(self, value: Any) -> Any:
        from nbdist.torch import unwrap

        return unwrap(value)

    def export_is_collective(self, value: Any) -> bool:
        from nbdist.torch_parallel import is_sharded

        return isinstance(value, torch.nn.Module) and is_sharded(value)

    def memory(self, namespace: dict[str, Any]) -> dict[str, float]:
        from nbdist.torch_parallel import memory

        return memory(namespace)

    def describe_device(self, info: RankInfo) -> str:
        return f"cuda:{info.gpu}" if info.gpu is not None else f"cpu ({info.threads} threads)"
