"""The run history of a pool, kept in the kernel: every metric record of every cell (the cell
runner adds each cell's records when it ends)."""

from __future__ import annotations

import functools
from typing import Any


@functools.cache
def _frame_type() -> type:
    import pandas as pd

    class MetricFrame(pd.DataFrame):
        """The history as a DataFrame; filtering it (one cell, one rank) keeps `to_tensorboard`."""

        @property
        def _constructor(self) -> type:
            return MetricFrame

        def to_tensorboard(self, logdir: str) -> list[str]:
            """Write these rows as TensorBoard scalars under `logdir`, one run per cell; return
            the run folders. Needs the `tensorboard` package."""
            from nbdist.kernel._tensorboard import write_history

            return write_history(self.to_dict("records"), logdir)

    return MetricFrame


class History:
    """Rows of reported metrics, one per (rank, report), across every cell of a pool."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def extend(self, rows: list[dict[str, Any]]) -> None:
        self.rows.extend(rows)

    def frame(self) -> Any:
        """A pandas DataFrame (pandas is imported only when asked for), which can also write
        itself to TensorBoard: `nbdist.history().to_tensorboard(DIR)`."""
        return _frame_type()(self.rows)

    def to_tensorboard(self, logdir: str) -> list[str]:
        """Write every cell's metrics as TensorBoard scalars under `logdir`, one run per cell
        (see `%%distributed --tensorboard`); return the run folders. Needs `tensorboard`."""
        from nbdist.kernel._tensorboard import write_history

        return write_history(self.rows, logdir)

    def __len__(self) -> int:
        return len(self.rows)
