"""Metrics in TensorBoard: `%%distributed --tensorboard DIR` and `history().to_tensorboard(DIR)`
on a real pool, read back with TensorBoard's own event reader and compared with the history."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from IPython.core.interactiveshell import InteractiveShell

import nbdist
from nbdist.kernel._magics import NbdistMagics

pytest.importorskip("tensorboard")
from nbdist.kernel._tbwriter import TensorBoardObserver  # noqa: E402
from nbdist.kernel._tensorboard import _without_tensorflow  # noqa: E402

_without_tensorflow()  # the reader too would import all of TensorFlow for its file access
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

pytestmark = pytest.mark.integration

CELL = ("for i in range(30):\n"
        "    nbdist.report(step=i, loss=1.0 / (i + 1) + rank, accuracy=0.5 + i / 100, samples=16, comm_s=0.001)\n"
        "    __import__('time').sleep(0.06)")


def scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(run))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def only_run(logdir: Path) -> Path:
    runs = [p for p in logdir.iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


def test_the_tensorboard_option_writes_what_the_history_holds(shell: InteractiveShell, magics: NbdistMagics,
                                                              tmp_path: Path) -> None:
    pool = magics.pool
    assert pool is not None
    before = len(pool.history)
    assert shell.run_cell(f"%%distributed --no-dashboard --tensorboard {tmp_path}\n{CELL}").success
    frame = nbdist.history(pool).iloc[before:]
    # Written by the helper process after the cell returned:
    assert nbdist.flush_tensorboard() == [str(only_run(tmp_path))]
    run = only_run(tmp_path)
    assert run.name.endswith(f"-cell{frame.cell.iloc[0]}")
    for rank in (0, 1):
        mine = frame[(frame.kind == "train") & (frame["rank"] == rank)]
        written = scalars(run / f"rank{rank}")
        for tag in ("loss", "accuracy", "samples"):
            expected = list(zip(mine.step.astype(int), mine[tag], strict=True))
            assert [(s, round(v, 5)) for s, v in written[tag]] == [(s, round(v, 5)) for s, v in expected]
        load = frame[(frame.kind == "load") & (frame["rank"] == rank)]
        assert len(load) >= 1  # a ~2 s cell has load samples
        assert [round(v, 3) for _, v in written["load/rss_mb"]] == [round(v, 3) for v in load.rss_mb]
    pool_run = scalars(run / "pool")
    rates = [v for _, v in pool_run["throughput/samples_per_s"]]
    assert len(rates) == 29 and all(v > 0 and math.isfinite(v) for v in rates)  # 32 samples per ~60 ms step
    assert all(0 <= v <= 1 for _, v in pool_run["comm/share"])
    assert "load/cpu_mean" in pool_run


def test_the_history_writes_itself_after_the_fact(pool: nbdist.Pool, tmp_path: Path) -> None:
    pool.run(CELL)
    frame = nbdist.history(pool)
    last = frame[frame.cell == frame.cell.iloc[-1]]
    folders = last.to_tensorboard(str(tmp_path))  # a filtered frame keeps the method
    assert len(folders) == 1
    written: dict[str, Any] = scalars(Path(folders[0]) / "rank1")
    mine = last[(last.kind == "train") & (last["rank"] == 1)]
    assert [s for s, _ in written["loss"]] == mine.step.astype(int).tolist()
    assert [round(v, 5) for _, v in written["loss"]] == [round(v, 5) for v in mine.loss]


def _store(rows: int) -> Any:
    from nbdist.kernel._store import MetricStore

    store = MetricStore("7")
    for rank in (0, 1):
        for i in range(rows):
            store._add(rank, {"t": 1e9 + i * 0.01, "step": i, "loss": 1.0 / (i + 1), "samples": 8})
    return store


def test_a_folder_that_cannot_be_made_is_refused_before_the_cell(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(nbdist.ConfigError, match="cannot make that folder"):
        TensorBoardObserver(str(blocker / "runs"))


def test_a_write_that_fails_later_is_said_not_lost_in_silence(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    logdir = tmp_path / "runs"
    observer = TensorBoardObserver(str(logdir))
    logdir.rmdir()
    logdir.write_text("")  # the folder became a file between the option and the cell's end
    observer.cell_started(_store(5))
    observer.cell_finished(ok=True)
    assert nbdist.flush_tensorboard() == []
    assert "writing TensorBoard events failed" in capsys.readouterr().err


def test_the_writer_finishes_its_jobs_and_exits_when_the_kernel_goes(tmp_path: Path) -> None:
    """A kernel that ends (or is killed) closes the pipe: the child writes what it was given,
    then exits, leaving the events whole and no process behind."""
    from nbdist.kernel._tbwriter import BackgroundWriter

    writer = BackgroundWriter()
    writer.submit(_store(3000).records, str(tmp_path), "run")
    proc = writer._proc
    assert proc is not None
    writer.close()
    assert proc.wait(timeout=60) == 0
    written = scalars(tmp_path / "run" / "rank1")
    assert [s for s, _ in written["loss"]] == list(range(3000))
