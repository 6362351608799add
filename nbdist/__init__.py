"""nbdist: distributed deep-learning training from a notebook.

Importing nbdist never imports torch or TensorFlow: frameworks are imported on engines.
"""

from __future__ import annotations

from typing import Any

from nbdist import metrics as _metrics
from nbdist.config import PoolConfig
from nbdist.dashboard import Dashboard
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
    "Dashboard",
    "DistributedCellError",
    "NbdistError",
    "Pool",
    "PoolConfig",
    "PoolStartError",
    "PoolStateError",
    "PoolWidget",
    "ScalingReport",
    "history",
    "report",
    "scaling_report",
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
    # Submodules that import torch when used: load them only when asked (on engines).
    import importlib

    if name in ("torch", "checkpoint", "keras"):
        return importlib.import_module(f"nbdist.{name}")
    if name in ("scaling_report", "ScalingReport"):
        return getattr(importlib.import_module("nbdist.scaling"), name)
    if name == "PoolWidget":  # ipywidgets is imported only when the panel is asked for
        return importlib.import_module("nbdist.widget").PoolWidget
    raise AttributeError(f"module 'nbdist' has no attribute {name!r}")


def report(**values: Any) -> None:
    """Send metrics to the live dashboard: `nbdist.report(step=i, loss=l, samples=n)`.

    Call it every step: it only appends to a buffer. Outside a `%%distributed` cell it
    does nothing, so the same code runs under torchrun or in a plain script."""
    _metrics.report(**values)


def history(pool: Pool | None = None) -> Any:
    """Every metric reported so far on `pool` (default: the notebook's `%nbdist` pool),
    as a pandas DataFrame with columns cell, rank, kind, t, step, loss, samples, ..."""
    if pool is None:
        from nbdist.magics import notebook_pool

        pool = notebook_pool()
    return pool.history.frame()
