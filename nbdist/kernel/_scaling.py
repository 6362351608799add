"""Scaling report: run the same training cell at 1 and at N engines, compare throughput.

Throughput is counted from what the cell reports (`nbdist.report(samples=...)`), so the
comparison is in samples per second whatever the per-rank batch size is.
"""

from __future__ import annotations

import io
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from nbdist._errors import ConfigError
from nbdist.kernel._pool import Pool


@dataclass
class ScalingReport:
    table: Any
    """pandas DataFrame: engines, seconds, samples, samples_per_s, speedup, efficiency."""
    losses: dict[int, Any]
    """Mean loss by step for each engine count (pandas Series)."""

    def figure(self) -> Any:
        from matplotlib.figure import Figure

        fig = Figure(figsize=(11, 3.4), dpi=80)
        fig.subplots_adjust(left=0.06, right=0.98, bottom=0.16, top=0.88, wspace=0.3)
        speed, eff, loss = fig.subplots(1, 3)
        n = self.table.engines.tolist()
        speed.plot(n, self.table.speedup, "o-", label="measured")
        speed.plot(n, [x / n[0] for x in n], "k--", lw=1, label="ideal")
        speed.set(title="speedup (samples/s)", xlabel="engines")
        speed.legend(fontsize=8)
        eff.bar([str(x) for x in n], self.table.efficiency, color="tab:green")
        eff.set(title="scaling efficiency", xlabel="engines", ylim=(0, 1.1))
        for engines, series in self.losses.items():
            loss.plot(series.index, series.values, label=f"{engines} engine{'' if engines == 1 else 's'}", lw=1)
        loss.set(title="mean loss by step", xlabel="step")
        loss.legend(fontsize=8)
        return fig

    def _repr_png_(self) -> bytes:
        buffer = io.BytesIO()
        self.figure().savefig(buffer, format="png")
        return buffer.getvalue()


def scaling_report(source: str, engines: Sequence[int] = (1, 2), *, backend: str = "torch",
                   setup: str = "") -> ScalingReport:
    """Run `source` (after `setup`, untimed) on a fresh pool of each size in `engines`."""
    import pandas as pd

    if not engines or any(n < 1 for n in engines):
        raise ConfigError("engines must be a non-empty list of engine counts, e.g. (1, 2).")
    rows, losses = [], {}
    for n in engines:
        with Pool(n, gpus="none") as pool:
            if setup:
                pool.run(setup, backend=backend)
            started = time.perf_counter()
            pool.run(source, backend=backend)
            seconds = time.perf_counter() - started
            frame = pool.history.frame()
        train = frame[frame.kind == "train"] if "kind" in frame else frame
        samples = float(train["samples"].sum()) if "samples" in train else float("nan")
        rows.append({"engines": n, "seconds": seconds, "samples": samples, "samples_per_s": samples / seconds})
        if "loss" in train and "step" in train:
            losses[n] = train.groupby("step").loss.mean()
    table = pd.DataFrame(rows)
    base = table.samples_per_s.iloc[0]
    table["speedup"] = table.samples_per_s / base
    table["efficiency"] = table.speedup / (table.engines / table.engines.iloc[0])
    return ScalingReport(table, losses)
