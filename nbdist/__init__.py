"""nbdist: distributed deep-learning training from a notebook.

The layout says which process code runs in: `kernel/` (the notebook kernel), `cluster/`
(starting and watching the engines' processes, from the kernel), `engine/` (inside each
engine), `backends/` (a framework and its strategies, imported on engines), and the helpers
cells import at the top (`nbdist.torch`, `nbdist.keras`, `nbdist.checkpoint`). Importing
nbdist never imports torch or TensorFlow.
"""

from __future__ import annotations

from typing import Any

from nbdist._errors import (
    ConfigError,
    DistributedCellError,
    NbdistError,
    PoolStartError,
    PoolStateError,
    PoolValueError,
)
from nbdist.cluster import PoolConfig
from nbdist.engine import _metrics
from nbdist.kernel._dashboard import Dashboard
from nbdist.kernel._pool import Pool

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
    "PoolValueError",
    "PoolWidget",
    "ScalingReport",
    "breakpoint",
    "flush_tensorboard",
    "history",
    "report",
    "scaling_report",
    "load_ipython_extension",
    "unload_ipython_extension",
]


def load_ipython_extension(ipython: Any) -> None:
    from nbdist.kernel._magics import NbdistMagics

    ipython.register_magics(NbdistMagics(ipython))


def unload_ipython_extension(ipython: Any) -> None:
    from nbdist.kernel._session import MAGICS_NAME

    magics = ipython.magics_manager.registry.get(MAGICS_NAME)
    if magics is not None:
        magics.shutdown()


def __getattr__(name: str) -> Any:
    # Helpers that import a framework when used: loaded only when asked (on engines).
    import importlib

    if name in ("torch", "checkpoint", "keras"):
        return importlib.import_module(f"nbdist.{name}")
    if name in ("scaling_report", "ScalingReport"):
        return getattr(importlib.import_module("nbdist.kernel._scaling"), name)
    if name == "PoolWidget":  # ipywidgets is imported only when the panel is asked for
        return importlib.import_module("nbdist.kernel._widget").PoolWidget
    raise AttributeError(f"module 'nbdist' has no attribute {name!r}")


def report(**values: Any) -> None:
    """Send metrics to the live dashboard: `nbdist.report(step=i, loss=l, samples=n)`.

    Call it every step: it only appends to a buffer. Outside a `%%distributed` cell it
    does nothing, so the same code runs under torchrun or in a plain script."""
    _metrics.report(**values)


def breakpoint() -> None:  # noqa: A001 - the name users know from Python's own
    """Stop the cell here on rank 0 and debug it from the notebook (pdb's commands, typed in the
    notebook's input box); the other ranks wait at their next collective. `c` goes on, `q` ends
    the cell. Elsewhere (a script, torchrun) it does nothing."""
    import sys

    from nbdist.engine._debug import breakpoint as stop_here

    stop_here(sys._getframe(1))


def history(pool: Pool | None = None) -> Any:
    """Every metric reported so far on `pool` (default: the notebook's `%nbdist` pool),
    as a pandas DataFrame with columns cell, rank, kind, t, step, loss, samples, ..."""
    if pool is None:
        from nbdist.kernel._session import notebook_pool

        pool = notebook_pool()
    return pool.history.frame()


def flush_tensorboard(timeout: float | None = 60.0) -> list[str]:
    """Wait until the events of every `--tensorboard` cell so far are on disk, and return their
    run folders: cells return before their events are written, which a script reading them at
    once needs to wait for (TensorBoard itself reloads on its own)."""
    from nbdist.kernel._tbwriter import flush

    return flush(timeout)
