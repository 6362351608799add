"""What runs inside an engine process: its context and pinning, cell execution, metrics, load.

The kernel calls the functions of `_calls` and `_cell` through ipyparallel; cell helpers
(`nbdist.torch`, `nbdist.keras`) read the engine's context and report metrics through the
names below. Nothing here imports a framework at load time.
"""

from __future__ import annotations

from nbdist.engine._context import EngineContext, current
from nbdist.engine._metrics import active, add_time, report

__all__ = ["EngineContext", "active", "add_time", "current", "report"]
