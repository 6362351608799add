"""What every PyTorch strategy adds to `Strategy`: how `nbdist.torch.prepare` treats a model."""

from __future__ import annotations

from typing import Any

from nbdist.backends._base import Strategy


class TorchStrategy(Strategy):
    def prepare(self, model: Any, **options: Any) -> Any:
        """Place `model` on this rank's device and parallelise it (engines only)."""
        raise NotImplementedError
