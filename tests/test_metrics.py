"""Metrics: the store and reporter as units, then 2,000 steps through a real pool."""

from __future__ import annotations

import io
import random
import threading
import time

import numpy as np
import pytest
from IPython.core.interactiveshell import InteractiveShell
from PIL import Image

import nbdist
from nbdist._wire import METRICS_KEY_PREFIX as KEY_PREFIX
from nbdist.engine._metrics import Reporter
from nbdist.kernel._dashboard import Dashboard, _MeanLoss
from nbdist.kernel._magics import NbdistMagics
from nbdist.kernel._store import MetricStore


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_reporter_batches_by_time_and_numbers_batches() -> None:
    published: list[dict[str, object]] = []
    clock = FakeClock()
    reporter = Reporter(published.append, interval=0.25, clock=clock)
    for step in range(10):
        reporter.report({"step": step})
    assert published == []  # nothing leaves before the interval
    clock.now = 0.3
    reporter.report({"step": 10})
    reporter.add_time("comm_s", 0.5)
    reporter.report({"step": 11})
    reporter.flush()
    assert [list(batch) for batch in published] == [[f"{KEY_PREFIX}0"], [f"{KEY_PREFIX}1"]]
    first = published[0][f"{KEY_PREFIX}0"]
    assert [r["step"] for r in first] == list(range(11))  # type: ignore[index,union-attr]
    assert published[1][f"{KEY_PREFIX}1"][0]["comm_s"] == 0.5  # type: ignore[index]


def test_store_takes_every_batch_once_in_order_whatever_the_arrival() -> None:
    store = MetricStore()
    batches = {f"{KEY_PREFIX}{i}": [{"step": 10 * i + j, "loss": 1.0, "t": float(i)} for j in range(10)]
               for i in range(50)}
    keys = list(batches)
    random.Random(0).shuffle(keys)
    data: dict[str, object] = {}
    for key in keys:  # batches become visible in random order, as dict updates may
        data[key] = batches[key]
        store.ingest(0, data)
        store.ingest(0, data)  # reading twice must not duplicate
    steps = store.train[0].columns["step"]
    assert steps == [float(s) for s in range(500)]


def test_throughput_and_comm_fraction() -> None:
    store = MetricStore()
    rows = [{"step": i, "samples": 10, "t": i * 0.1, "comm_s": 0.025} for i in range(21)]
    store.ingest(0, {f"{KEY_PREFIX}0": rows})
    samples_s, steps_s = store.throughput(window=1.0)
    assert samples_s == pytest.approx(100.0) and steps_s == pytest.approx(10.0)
    assert store.comm_fraction(0) == pytest.approx(0.25)


def test_report_is_a_no_op_outside_a_cell() -> None:
    nbdist.report(step=1, loss=0.5)  # no pool, no error


@pytest.mark.integration
def test_two_thousand_steps_arrive_exactly_once_with_load(pool: nbdist.Pool) -> None:
    before = len(pool.history)
    dashboard = Dashboard(refresh=0.2, keep_png=False)
    pool.run("import time\nfor i in range(2000):\n    nbdist.report(step=i, loss=1.0 / (i + 1), samples=8)\n"
             "    if i % 500 == 0: time.sleep(0.3)", observers=[dashboard])
    frame = nbdist.history(pool).iloc[before:]
    train = frame[frame.kind == "train"]
    for rank in (0, 1):
        assert train[train["rank"] == rank].step.tolist() == list(range(2000))
    load = frame[frame.kind == "load"]
    assert set(load["rank"]) == {0, 1} and (load.rss_mb > 0).all()
    assert dashboard.renders >= 2 and dashboard.points("loss") > 0


@pytest.mark.integration
def test_dashboard_leaves_a_png_in_the_cell_output(shell: InteractiveShell, magics: NbdistMagics,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    shown: list[object] = []
    shell.display_pub.publish = lambda data, metadata=None, **kw: shown.append(data)  # type: ignore[method-assign]
    try:
        assert shell.run_cell("%%distributed\nfor i in range(50):\n    nbdist.report(step=i, loss=1.0)").success
        assert any("image/png" in d for d in shown if isinstance(d, dict))
        shown.clear()
        quiet = "%%distributed --no-dashboard\nfor i in range(50):\n    nbdist.report(step=i, loss=1.0)"
        assert shell.run_cell(quiet).success
        assert not any("image/png" in d for d in shown if isinstance(d, dict))
    finally:
        del shell.display_pub.publish


def _fill(store: MetricStore, start: int, stop: int) -> None:
    for rank in (0, 1):
        rows = [{"t": i * 0.01, "step": i, "loss": 2.0 / (1 + i / 100) + rank * 0.01, "samples": 8, "comm_s": 0.002}
                for i in range(start, stop)]
        store.ingest(rank, {f"{KEY_PREFIX}{start // 100}": rows})


def test_dashboard_blits_and_redraws_axes_only_when_data_outgrows_them() -> None:
    store = MetricStore()
    dashboard = Dashboard()
    dashboard.cell_started(store)
    dashboard._started = 0.0
    _fill(store, 0, 100)
    dashboard.cell_polled()  # the first (full) draw, on the drawing thread
    dashboard.wait()
    assert dashboard.full_draws == 1 and dashboard.points("loss") == 300  # two ranks and the mean
    dashboard.render()
    assert (dashboard.full_draws, dashboard.partial_draws) == (1, 0)  # nothing grew: blit only
    _fill(store, 100, 200)
    dashboard.render()  # steps 100..199 fit in the headroom left at step 99
    assert (dashboard.full_draws, dashboard.partial_draws) == (1, 0) and dashboard.points("loss") == 600
    _fill(store, 200, 1000)
    dashboard.render()
    assert dashboard.partial_draws == 1 and dashboard.figure.axes["loss"].get_xlim()[1] >= 999
    png = dashboard.render(final=True)
    assert png.startswith(b"\x89PNG")
    assert dashboard.figure.axes["loss"].get_xlim()[1] == 3000  # the live limits, back for the next cell


def test_mean_loss_is_over_ranks_per_step() -> None:
    store = MetricStore()
    _fill(store, 0, 300)
    steps, means = _MeanLoss().update(store)
    assert steps == list(range(300))
    assert means[10] == pytest.approx(2.0 / 1.1 + 0.005)


def test_final_png_is_the_picture_drawn_from_scratch() -> None:
    """The PNG left in the notebook must not keep the live frames' tick labels: a short cell is
    drawn live on 30 s axes, and its final picture fits the data tightly."""
    from nbdist.kernel._figure import DashboardFigure, Frame, Line

    steps = list(range(20))
    seconds = [0.2 * s for s in steps]  # a 4 s cell: its live time axes open at 30 s
    frame = Frame(lines={
        ("loss", 0): Line(steps, [1.0 / (1 + s) for s in steps], {"label": "rank 0", "color": "C0"}),
        ("throughput", "all"): Line(seconds, [100.0] * 20, {"color": "tab:green"}),
        ("load", 0): Line(seconds, [50.0] * 20, {"label": "rank 0", "color": "C0"}),
    })
    live = DashboardFigure()
    live_picture = live.draw(frame)
    assert live.axes["throughput"].get_xlim()[1] == 30.0
    final = live.draw(frame, final=True)
    fresh = DashboardFigure().draw(frame, final=True)
    assert final == fresh
    assert live.draw(frame) == live_picture  # and the live view goes on from its own axes
    # A next cell on the same figure, shorter and without load samples, ends on its own picture too.
    short = Frame(lines={key: Line(line.xs[:5], line.ys[:5], line.style)
                         for key, line in frame.lines.items() if key[0] != "load"})
    live.new_run()
    live.draw(short)
    assert live.draw(short, final=True) == DashboardFigure().draw(short, final=True)


def _load(store: MetricStore, **more: float) -> None:
    for rank in (0, 1):
        rows = [{"kind": "load", "t": time.time() + i, "cpu": 90.0, "rss_mb": 400.0, **more} for i in range(5)]
        store.ingest(rank, {f"{KEY_PREFIX}1": rows})


def _panel(dashboard: Dashboard, picture: bytes, name: str) -> np.ndarray:
    x0, y0, x1, y1 = (int(v) for v in dashboard.figure.axes[name].bbox.extents)
    pixels = np.asarray(Image.open(io.BytesIO(picture)).convert("L"), dtype=float)
    return pixels[pixels.shape[0] - y1 - 25:pixels.shape[0] - y0 + 25, x0 - 40:x1 + 5]  # with its ticks


def test_a_reused_dashboard_draws_a_new_cell_without_a_new_figure() -> None:
    """`%%distributed` keeps one dashboard: the next cell shows only its own data, on axes opened
    for it, and pays for a redraw of the panels that changed, not for a whole new figure."""
    dashboard = Dashboard(keep_png=False)
    first = MetricStore()
    dashboard.cell_started(first)
    _fill(first, 0, 1000)
    _load(first, param_mb=50.0, grad_mb=50.0, optim_mb=100.0)  # model state: a line the next cell lacks
    dashboard.render()
    dashboard.render(final=True)
    draws = dashboard.full_draws
    second = MetricStore()
    _fill(second, 0, 100)
    _load(second)
    dashboard.cell_started(second)
    reused = dashboard.render()
    assert dashboard.full_draws == draws and dashboard.partial_draws >= 1
    assert dashboard.figure.axes["loss"].get_xlim() == (0.0, 300.0)  # opened for 100 steps, not 1,000
    fresh = Dashboard(keep_png=False)
    fresh.cell_started(second)
    new = fresh.render()
    # The panels, ticks included, look as a new figure draws them: nothing of the first cell.
    for name in ("loss", "memory"):
        assert np.abs(_panel(dashboard, reused, name) - _panel(fresh, new, name)).max() < 40, name


def test_model_memory_is_scanned_on_the_training_thread_between_steps() -> None:
    """The memory scan reads tensors that backward writes without the GIL: run on the sampler's
    thread it crashed engines with SIGSEGV. `report()` runs it, once per load sample."""
    from nbdist.engine import _metrics as metrics
    from nbdist.engine._load import LoadSampler

    scans: list[str] = []

    def scan() -> dict[str, float]:
        scans.append(threading.current_thread().name)
        return {"param_mb": 1.5}

    published: list[dict[str, object]] = []
    reporter = Reporter(published.append, interval=0.0)
    sampler = LoadSampler(reporter.report, None, interval=0.05, extra=scan)
    metrics.activate(reporter, between_steps=sampler.between_steps)
    sampler.start()
    steps = 0
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any(
                r.get("param_mb") == 1.5 for batch in published for rows in batch.values() for r in rows):
            nbdist.report(step=steps, loss=1.0)
            steps += 1
            time.sleep(0.005)
    finally:
        sampler.stop()
        metrics.activate(None)
    rows = [r for batch in published for rs in batch.values() for r in rs]
    loads = [r for r in rows if r.get("kind") == "load"]
    assert any(r.get("param_mb") == 1.5 for r in loads)
    assert scans and set(scans) == {threading.current_thread().name}  # never the sampler's thread
    assert len(scans) <= len(loads) + 1 < steps  # once per sample, not once per step
