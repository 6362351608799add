"""nbdist: distributed deep-learning training from a notebook.

Importing nbdist never imports torch or TensorFlow: frameworks are imported on engines.
"""

from __future__ import annotations

from typing import Any

from nbdist.config import PoolConfig
from nbdist.errors import (
    ConfigError,
    DistributedCellError,
    NbdistError,
    PoolStartError,
    PoolStateError,
)
from nbdist.pool import Pool

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "DistributedCellError",
    "NbdistError",
    "Pool",
    "PoolConfig",
    "PoolStartError",
    "PoolStateError",
    "load_ipython_extension",
    "unload_ipython_extension",
]


def load_ipython_extension(ipython: Any) -> None:
    from nbdist.magics import NbdistMagics

    ipython.register_magics(NbdistMagics(ipython))


def unload_ipython_extension(ipython: Any) -> None:
    from nbdist.magics import NbdistMagics

    magics = ipython.magics_manager.registry.get(NbdistMagics.__name__)
    if magics is not None:
        magics.shutdown()


def __getattr__(name: str) -> Any:
    # `nbdist.torch` is a submodule that imports torch: load it only when asked (on engines).
    if name in ("torch",):
        import importlib

        return importlib.import_module(f"nbdist.{name}")
    raise AttributeError(f"module 'nbdist' has no attribute {name!r}")
