"""`--strategy tensor`: layers split across ranks with DTensor (Megatron-style plans)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from nbdist.backends.torch._strategy import TorchStrategy

if TYPE_CHECKING:
    from torch import nn


class TensorParallel(TorchStrategy):
    """Each rank holds a slice of every split layer; activations are all-reduced in forward
    and backward. Latency-bound like a pipeline: every thread stays on the rank's cores."""

    name = "tensor"
    threads = "all"

    def prepare(self, model: Any, **options: Any) -> Any:
        return tensor_parallel(model, **options)


def mlp_plan(model: nn.Module) -> dict[str, Any]:
    """Megatron-style plan for consecutive Linear layers: column-wise then row-wise, in pairs,
    so each pair needs one all-reduce in forward and one in backward."""
    from torch import nn
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

    from nbdist.backends.torch._device import mesh, rank_device

    model = model.to(rank_device())
    return parallelize_module(model, mesh(), plan if plan is not None else mlp_plan(model))
