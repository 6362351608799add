"""The run history of a pool, kept in the kernel: every metric record of every cell (the cell
runner adds each cell's records when it ends)."""

from __future__ import annotations

from typing import Any


class History:
    """Rows of reported metrics, one per (rank, report), across every cell of a pool."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def extend(self, rows: list[dict[str, Any]]) -> None:
        self.rows.extend(rows)

    def frame(self) -> Any:
        """A pandas DataFrame (pandas is imported only when asked for)."""
        import pandas as pd

        return pd.DataFrame(self.rows)

    def __len__(self) -> int:
        return len(self.rows)
