"""`--strategy ddp` (the default): DistributedDataParallel with a timed all-reduce hook."""

from __future__ import annotations

import time
from typing import Any

from nbdist.backends.torch._strategy import TorchStrategy


class DDP(TorchStrategy):
    """Every rank holds the whole model; gradients are averaged by all-reduce in backward.

    Only the compute thread is kept on the rank's cores: gloo's threads overlap the
    all-reduce with backward and need another core for it."""

    name = "ddp"
    threads = "compute"

    def prepare(self, model: Any, **options: Any) -> Any:
        from torch.nn.parallel import DistributedDataParallel

        from nbdist.backends.torch._device import rank_device

        dev = rank_device()
        model = model.to(dev)
        device_ids = [dev.index] if dev.type == "cuda" else None
        ddp = DistributedDataParallel(model, device_ids=device_ids, **options)
        ddp.register_comm_hook(state=None, hook=timed_allreduce_hook())
        return ddp


def timed_allreduce_hook() -> Any:
    """DDP's own all-reduce, timed from launch to completion for the dashboard's
    compute/communication split (`comm_s` in reported records)."""
    import torch
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    from nbdist.engine import add_time

    def hook(state: object, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        started = time.perf_counter()
        future = default_hooks.allreduce_hook(None, bucket)  # type: ignore[arg-type]

        def done(fut: torch.futures.Future[torch.Tensor]) -> torch.Tensor:
            add_time("comm_s", time.perf_counter() - started)
            return fut.value()

        return future.then(done)

    # DDP checks the hook's annotations as objects; postponed annotations made them strings.
    hook.__annotations__ = {"state": object, "bucket": dist.GradBucket, "return": torch.futures.Future[torch.Tensor]}
    return hook
