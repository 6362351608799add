"""The dashboard reads at a glance: what each panel shows in the picture a cell leaves behind.

Units on a real `MetricStore` and the real matplotlib figure; the same figure runs live under
every `%%distributed` cell (tests/test_metrics.py covers its drawing costs)."""

from __future__ import annotations

import time

from nbdist._wire import METRICS_KEY_PREFIX as KEY_PREFIX
from nbdist.kernel._dashboard import Dashboard
from nbdist.kernel._store import MetricStore

T0 = 1_000_000.0  # the cell's start, as wall-clock seconds


def _cell(comm: bool, steps: int = 200, state_mb: float | None = 1.6) -> Dashboard:
    """A 2-rank cell of `steps` reports, 10 ms apart from 0.5 s in, with four load samples."""
    store = MetricStore()
    dashboard = Dashboard(keep_png=False)
    dashboard.cell_started(store)
    dashboard._started = T0
    for rank in (0, 1):
        rows = [{"t": T0 + 0.5 + i * 0.01, "step": i, "loss": 1.0 / (1 + i), "samples": 32,
                 **({"comm_s": 0.002} if comm else {})} for i in range(steps)]
        state = {} if state_mb is None else {"param_mb": state_mb / 4, "grad_mb": state_mb / 4,
                                             "optim_mb": state_mb / 2}
        loads = [{"kind": "load", "t": T0 + 0.5 + j * 0.5, "cpu": 97.0, "rss_mb": 350.0, **state}
                 for j in range(4)]
        store.ingest(rank, {f"{KEY_PREFIX}0": rows + loads})
    return dashboard


def _final(dashboard: Dashboard) -> None:
    """Render the PNG the cell leaves, and set the figure's limits to that picture's (the
    figure puts the live view's limits back after drawing it)."""
    dashboard.render(final=True)
    dashboard.figure._fit_tight()


def test_model_state_is_a_number_per_rank_not_a_line_on_the_memory_axis() -> None:
    """A few MB of model state beside 350 MB of process memory sat on the zero line: the panel
    writes it per rank instead, and plots only the process memory."""
    dashboard = _cell(comm=True)
    _final(dashboard)
    memory = dashboard.figure.axes["memory"]
    assert [line.get_label() for line in memory.lines if len(line.get_xdata())] == ["rank 0", "rank 1"]
    note = " ".join(text.get_text() for text in memory.texts)
    assert "model state per rank" in note and "0: 1.60 MB" in note and "1: 1.60 MB" in note
    assert memory.get_ylim()[1] >= 350.0


def test_throughput_starts_at_its_first_measured_value() -> None:
    """No ramp from a made-up 0 at the cell's start: the first point is the first rate."""
    dashboard = _cell(comm=True)
    live = dashboard._prepare(600)
    throughput = live.lines[("throughput", "all")]
    assert min(throughput.ys) > 0
    dashboard.render(final=True)
    line = next(line for line in dashboard.figure.axes["throughput"].lines if len(line.get_xdata()))
    assert min(line.get_ydata()) > 0
    assert len(line.get_xdata()) > 50  # a 2.5 s cell: drawn through its run, not from 2-3 frames
    assert abs(max(line.get_ydata()) - 2 * 32 / 0.01) < 1  # 2 ranks x 32 samples every 10 ms


def test_short_cells_fill_their_time_axes() -> None:
    """A 2-second cell whose first figures come half a second in: the time panels start at
    the data, not at 0, so the left of the panel is not empty."""
    dashboard = _cell(comm=True)
    _final(dashboard)
    for name in ("throughput", "load", "memory", "steps"):
        lo, hi = dashboard.figure.axes[name].get_xlim()
        assert 0.4 < lo < 0.55 and hi < 3.0, (name, lo, hi)


def test_overlapping_ranks_stay_distinguishable() -> None:
    """Equal memory on both ranks: the lower rank is drawn wider and solid, the upper dashed."""
    dashboard = _cell(comm=True)
    dashboard.render(final=True)
    first, second = (line for line in dashboard.figure.axes["memory"].lines if len(line.get_xdata()))
    assert list(first.get_ydata()) == list(second.get_ydata())
    assert first.get_linewidth() > second.get_linewidth()
    assert first.get_linestyle() == "-" and second.get_linestyle() == "--"


def test_the_communication_panel_says_when_nothing_was_timed() -> None:
    """DDP's all-reduce is timed; other strategies' collectives are not: their panel says so
    rather than showing empty axes from -0.05 to 0.05."""
    timed = _cell(comm=True)
    timed.render(final=True)
    comm = timed.figure.axes["comm"]
    assert [tick.get_text() for tick in comm.get_xticklabels()] == ["0", "1"]
    assert abs(comm.patches[-1].get_height() - 0.002 / 0.01) < 0.02  # 2 ms of every 10 ms step
    assert not "".join(text.get_text() for text in comm.texts)
    untimed = _cell(comm=False, state_mb=None)
    untimed.render(final=True)
    comm = untimed.figure.axes["comm"]
    assert "not measured" in "".join(text.get_text() for text in comm.texts)
    assert list(comm.get_xticks()) == []
    assert not "".join(text.get_text() for text in untimed.figure.axes["memory"].texts)


def test_a_short_cell_at_the_wall_clock_now_draws() -> None:
    """The same through `time.time()`-stamped records, as engines send them."""
    store = MetricStore()
    dashboard = Dashboard(keep_png=False)
    dashboard.cell_started(store)
    now = time.time()
    store.ingest(0, {f"{KEY_PREFIX}0": [{"t": now + i * 0.05, "step": i, "loss": 1.0, "samples": 4}
                                        for i in range(3)]})
    assert dashboard.render(final=True)[:4] == b"\x89PNG"


def test_a_note_is_redrawn_when_its_words_change_and_only_then() -> None:
    """Notes are part of their panel's background: drawn with every frame, their glyphs were
    most of a frame's cost. A frame whose notes say the same blits; new words redraw that panel."""
    dashboard = _cell(comm=False)
    first = dashboard.render()
    drawn = (dashboard.full_draws, dashboard.partial_draws)
    assert dashboard.render() and (dashboard.full_draws, dashboard.partial_draws) == drawn
    more = {"kind": "load", "t": T0 + 2.5, "cpu": 97.0, "rss_mb": 350.0, "param_mb": 1.0, "grad_mb": 1.0,
            "optim_mb": 2.0}
    assert dashboard.store is not None
    dashboard.store.ingest(0, {f"{KEY_PREFIX}1": [more]})  # the rank's next batch
    changed = dashboard.render()
    assert dashboard.partial_draws == drawn[1] + 1
    assert "0: 4.00 MB" in dashboard.figure.axes["memory"].texts[0].get_text()
    assert changed != first
