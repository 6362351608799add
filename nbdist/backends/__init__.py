"""Backends, named here and imported only on engines.

The kernel validates `--backend` / `--strategy` against `BACKENDS` without importing a
framework; an engine turns a name into a `Backend` with `load_backend`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from nbdist.backends.base import Backend, Formation, RankInfo
from nbdist.errors import ConfigError


@dataclass(frozen=True)
class BackendSpec:
    target: str
    """`module:Class`, imported on engines only."""
    strategies: tuple[str, ...]
    formed_per_strategy: bool = False
    """True where the engines are joined differently for each strategy (TensorFlow's cluster
    roles); PyTorch's one process group serves every strategy."""
    needs_peers: bool = False

    @property
    def default_strategy(self) -> str:
        return self.strategies[0]

    def formation(self, strategy: str, ps: int = 0) -> Formation:
        return Formation(strategy, ps) if self.formed_per_strategy else Formation(self.default_strategy)


BACKENDS: dict[str, BackendSpec] = {
    "torch": BackendSpec("nbdist.backends.torch_backend:TorchBackend", ("ddp", "fsdp", "pipeline", "tensor")),
    "tensorflow": BackendSpec(
        "nbdist.backends.tensorflow_backend:TensorFlowBackend", ("multiworker", "ps", "mirrored"),
        formed_per_strategy=True, needs_peers=True,
    ),
}


def check_choice(backend: str, strategy: str | None) -> str:
    """Return the strategy to use, or raise with the valid choices named."""
    spec = BACKENDS.get(backend)
    if spec is None:
        raise ConfigError(f"--backend {backend!r} is not known: choose one of {', '.join(BACKENDS)}.")
    if strategy is None:
        return spec.default_strategy
    if strategy not in spec.strategies:
        raise ConfigError(
            f"--strategy {strategy!r} is not available for {backend}: choose one of "
            f"{', '.join(spec.strategies)}."
        )
    return strategy


def load_backend(name: str) -> Backend:
    module_name, _, attr = BACKENDS[name].target.partition(":")
    cls = getattr(importlib.import_module(module_name), attr)
    backend: Backend = cls()
    return backend


__all__ = ["BACKENDS", "Backend", "BackendSpec", "Formation", "RankInfo", "check_choice", "load_backend"]
