"""The live training dashboard: an ipywidgets view of a `MetricStore`, drawn by `figure`.

It is a cell observer: the runner's poll loop calls it while the cell runs. Each second it
copies what changed into a `Frame` (cheap) and hands the drawing (the costly part) to one
low-priority thread. The kernel shares the cores with the engines, and a redraw at normal
priority preempts a training rank, which stalls every rank at the next allreduce. Even on a
SCHED_IDLE thread the drawing's CPU time showed up, nearly one for one, as lost throughput on 2
busy cores, so the figure is kept from cell to cell and its costly parts are few: ~0.1 s of
drawing per cell plus ~6 ms a frame (`benchmarks/run.py`: 0.99x of the dashboard off). When the
cell ends the widget is replaced by a static PNG, so executed notebooks show the plots on GitHub,
nbviewer and under nbval.
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from nbdist.kernel._figure import DashboardFigure, Frame, Line
from nbdist.kernel._store import MetricStore

LIVE_POINTS = 600  # a panel is ~250 px wide: more points per line only cost drawing time
FINAL_POINTS = 2000  # the PNG left in the notebook is drawn once, and zoomed into


def _thin(xs: list[float], ys: list[float], limit: int) -> tuple[list[float], list[float]]:
    step = max(1, math.ceil(len(xs) / limit))
    return xs[::step], ys[::step]


def _rank_style(rank: int) -> dict[str, Any]:
    """Ranks with equal load or memory draw on top of each other: lower ranks draw wider and
    higher ones dashed, so a line hidden under another still shows at its edges."""
    return dict(label=f"rank {rank}", color=f"C{rank % 10}", lw=max(1.0, 3.0 - 0.7 * (rank % 4)),
                ls=("-", "--", "-.", ":")[rank % 4], alpha=0.85)


def _megabytes(value: float) -> str:
    return f"{value:.2f} MB" if value < 10 else f"{value:,.0f} MB"


def _lower_priority() -> None:
    """Runs on the drawing thread, which then only runs on a core nothing else wants. Linux
    takes a thread id here, so only this thread yields, never the user's kernel."""
    if sys.platform.startswith("linux"):
        try:
            os.sched_setscheduler(threading.get_native_id(), os.SCHED_IDLE, os.sched_param(0))
        except OSError:
            pass  # draw at normal priority rather than not at all


class Dashboard:
    """Loss per rank and mean, throughput, device load and allreduce share, with progress.

    Works from the Python API too: `pool.run(code, observers=[dashboard])`. One dashboard can
    watch cell after cell, each drawn afresh; reusing it is cheaper than a new one per cell.
    """

    def __init__(self, refresh: float = 1.0, keep_png: bool = True) -> None:
        self.refresh = refresh
        self.keep_png = keep_png
        # Kept from cell to cell when the dashboard is reused (as `%%distributed` does): a new
        # cell then redraws only the panels whose limits change, not a whole new figure.
        self.figure = DashboardFigure()
        self.renders = 0
        self._painter: ThreadPoolExecutor | None = None
        self._inflight: tuple[Future[bytes], str] | None = None
        self._new_cell(None)

    def _new_cell(self, store: MetricStore | None) -> None:
        self.store = store
        self._started = time.time()
        self._last = 0.0
        self._shown = False
        self._handle: Any = None
        self._widgets: dict[str, Any] = {}
        self._throughput: list[tuple[float, float, float]] = []
        self._mean = _MeanLoss()
        self._finite: dict[int, _FiniteLoss] = {}
        self._frame = Frame()
        self._rates = (0.0, 0.0)  # (samples/s, steps/s) at the last frame

    @property
    def full_draws(self) -> int:
        return self.figure.full_draws

    @property
    def partial_draws(self) -> int:
        return self.figure.partial_draws

    # -- observer protocol ------------------------------------------------------------------

    def cell_started(self, store: MetricStore) -> None:
        self._new_cell(store)
        self.figure.new_run()

    def _show(self) -> None:
        """Display the widget once the cell reports its first training record, so cells that
        report nothing get no empty dashboard."""
        import ipywidgets as widgets
        from IPython.display import display

        self._widgets = {
            "progress": widgets.FloatProgress(min=0.0, max=1.0, value=0.0, description="progress"),
            "label": widgets.HTML(value="waiting for the first report..."),
            "image": widgets.Image(format="jpeg", layout=widgets.Layout(max_width="900px")),
        }
        box = widgets.VBox([widgets.HBox([self._widgets["progress"], self._widgets["label"]]),
                            self._widgets["image"]])
        self._widgets["box"] = box
        self._handle = display(box, display_id=True)

    @staticmethod
    def _shell() -> Any:
        from IPython import get_ipython

        return get_ipython()

    def cell_polled(self) -> None:
        if not self._shown:
            if self.store is None or not self.store.train:
                return
            self._shown = True
            if getattr(self._shell(), "kernel", None) is not None:
                self._show()  # a live widget needs a kernel to talk to
        self._take_drawn(block=False)
        now = time.monotonic()
        if self._inflight is None and now - self._last >= self.refresh:
            self._last = now
            self._frame = self._prepare(LIVE_POINTS)
            if self._painter is None:
                self._painter = ThreadPoolExecutor(1, "nbdist-dashboard", initializer=_lower_priority)
            self._inflight = (self._painter.submit(self.figure.draw, self._frame), self._label())

    def cell_finished(self, ok: bool) -> None:
        from IPython.display import Image, display

        try:
            self._take_drawn(block=True)
        finally:
            if self._painter is not None:
                self._painter.shutdown()
                self._painter = None
        if self.store is None or not self.store.train:
            return
        png = self.render(final=True)
        final = Image(data=png, format="png")
        box = self._widgets.get("box")
        if box is not None:
            # Replace the live widget, in place, by the static picture of its last state.
            if self.keep_png and self._handle is not None:
                self._handle.update(final)
            box.close()
        elif self.keep_png and self._shell() is not None:
            display(final)

    # -- frames -------------------------------------------------------------------------------

    def render(self, final: bool = False) -> bytes:
        """Draw the current state now, on this thread: a JPEG frame while live, a tightly
        fitted PNG when `final`."""
        self._take_drawn(block=True)  # the figure is one thread's at a time
        self._frame = self._prepare(FINAL_POINTS if final else LIVE_POINTS, final)
        frame = self.figure.draw(self._frame, final)
        self.renders += 1
        if not final:
            self._update_widgets(frame, self._label())
        return frame

    def points(self, axis: str = "loss") -> int:
        """How many points the given panel plots (tests read it to see the plot grow)."""
        return self._frame.points(axis)

    def wait(self) -> None:
        """Show the frame being drawn, once drawn: the live view is drawn in the background."""
        self._take_drawn(block=True)

    def _take_drawn(self, block: bool) -> None:
        """Show the frame the drawing thread finished, if any."""
        if self._inflight is None:
            return
        future, label = self._inflight
        if not block and not future.done():
            return
        self._inflight = None
        picture = future.result()
        self.renders += 1
        self._update_widgets(picture, label)

    def _prepare(self, limit: int, final: bool = False) -> Frame:
        """Copy from the store what the figure needs: the poll loop goes on adding to the store
        while the drawing thread works (`_thin` slices, so every list here is a copy)."""
        store = self.store
        assert store is not None
        frame = Frame(total=store.total)
        t0 = self._started
        for rank, series in sorted(store.train.items()):
            steps, losses = _thin(*self._finite.setdefault(rank, _FiniteLoss()).update(series), limit)
            frame.lines[("loss", rank)] = Line(steps, losses, dict(label=f"rank {rank}", color=f"C{rank % 10}", lw=1))
        mean = _thin(*self._mean.update(store), limit)
        if mean[0]:
            frame.lines[("loss", "mean")] = Line(*mean, dict(color="black", ls="--", lw=1.2, label="mean"))
        samples_s, steps_s = store.throughput()
        self._rates = (samples_s, steps_s)
        if samples_s > 0 or steps_s > 0:  # a rate needs two reports: no made-up 0 before them
            self._throughput.append((time.time() - t0, samples_s, steps_s))
        if final and store.train:
            # The picture that stays: rates through the whole run from the records, not only
            # the one per live frame (a 2 s cell had two or three of those).
            self._throughput = [(t - t0, *store.throughput(until=t)) for t in store.report_times(300)]
        if self._throughput:
            times, rates, paces = (list(c) for c in zip(*self._throughput, strict=False))
            frame.lines[("throughput", "all")] = Line(*_thin(times, rates, limit), dict(color="tab:green"))
            frame.lines[("steps", "all")] = Line(*_thin(times, paces, limit), dict(color="tab:purple"))
        states: list[str] = []
        for rank, series in sorted(store.load.items()):
            columns = series.columns
            gpu, gpu_mem = columns["gpu_util"], columns["gpu_mem_mb"]
            on_gpu = any(v == v for v in gpu)
            util = gpu if on_gpu else columns["cpu"]
            memory = gpu_mem if on_gpu else columns["rss_mb"]
            xs = [t - t0 for t in columns["t"]]
            style = _rank_style(rank)
            frame.lines[("load", rank)] = Line(*_thin(xs, util, limit), style)
            frame.lines[("memory", rank)] = Line(*_thin(xs, memory, limit), style)
            state = [p + g + o for p, g, o in zip(columns["param_mb"], columns["grad_mb"],
                                                   columns["optim_mb"], strict=False)]
            measured = [v for v in state if v == v]
            if measured:  # parameters + gradients + optimizer state: what sharding divides
                states.append(f"{rank}: {_megabytes(measured[-1])}")
        if states:
            frame.notes["memory"] = "model state per rank (params+grads+optimizer):\n" + " · ".join(states)
        ranks = sorted(store.train)
        shares = [store.comm_fraction(r) for r in ranks]
        if any(s is not None for s in shares):
            frame.comm = [(str(r), s or 0.0) for r, s in zip(ranks, shares, strict=True)]
        elif ranks:
            frame.notes["comm"] = ("not measured for this cell: nbdist times\nthe gradient all-reduce of "
                                   "PyTorch DDP\n(--strategy ddp); FSDP, pipeline, tensor\nparallel and "
                                   "TensorFlow collectives\nrun inside their libraries, untimed")
        return frame

    def _progress(self) -> float | None:
        """Share of the run done, when the cell gave its total number of steps."""
        store = self.store
        step = store.latest_step() if store is not None else None
        if step is None or store is None or not store.total:
            return None
        return min(1.0, (step + 1) / store.total)

    def _label(self) -> str:
        store = self.store
        assert store is not None
        samples_s, steps_s = self._rates
        step = store.latest_step()
        text = f"{samples_s:,.0f} samples/s, {steps_s:,.1f} steps/s"
        done = self._progress()
        if step is not None and done is not None:
            elapsed = time.time() - self._started
            eta = elapsed * (1 - done) / done if done > 0 else float("nan")
            text = f"step {int(step) + 1}/{store.total}, ETA {eta:,.0f} s &middot; " + text
        elif step is not None:
            text = f"step {int(step) + 1} &middot; " + text
        if store.restarts:
            text += f" &middot; retried {len(store.restarts)}&times;"
        # The plotted point count rides along, machine-readable, for browser tests and scripts.
        text += f' <span class="nbdist-points" data-points="{self.points("loss")}"></span>'
        return text

    def _update_widgets(self, picture: bytes, label: str) -> None:
        if not self._widgets:
            return
        self._widgets["image"].value = picture
        self._widgets["label"].value = label
        done = self._progress()
        if done is not None:
            self._widgets["progress"].value = done


class _FiniteLoss:
    """A rank's (step, loss) pairs without the records that carry no loss (steps counted
    without one, e.g. under a parameter server), kept incrementally."""

    def __init__(self) -> None:
        self.steps: list[float] = []
        self.losses: list[float] = []
        self._seen = 0

    def update(self, series: Any) -> tuple[list[float], list[float]]:
        steps, losses = series.columns["step"], series.columns["loss"]
        for step, loss in zip(steps[self._seen:], losses[self._seen:], strict=False):
            if loss == loss:
                self.steps.append(step)
                self.losses.append(loss)
        self._seen = len(steps)
        return self.steps, self.losses


class _MeanLoss:
    """Mean loss over ranks per step, kept incrementally: recomputing it from every record
    each second grew with the run and took longer than the drawing itself."""

    def __init__(self) -> None:
        self._seen: dict[int, int] = {}
        self._sums: dict[float, list[float]] = {}
        self._ranks = 0
        self.steps: list[float] = []
        self.means: list[float] = []

    def update(self, store: MetricStore) -> tuple[list[float], list[float]]:
        ranks = len(store.train)
        if ranks != self._ranks:  # a rank reported late: start over with the new count
            self.__init__()  # type: ignore[misc]
            self._ranks = ranks
        ordered = True
        for rank, series in store.train.items():
            steps, losses = series.columns["step"], series.columns["loss"]
            start = self._seen.get(rank, 0)
            for step, loss in zip(steps[start:], losses[start:], strict=False):
                if loss != loss:
                    continue
                acc = self._sums.setdefault(step, [0.0, 0])
                acc[0] += loss
                acc[1] += 1
                if acc[1] == ranks:
                    if self.steps and step < self.steps[-1]:
                        ordered = False
                    self.steps.append(step)
                    self.means.append(acc[0] / ranks)
                    del self._sums[step]
            self._seen[rank] = len(steps)
        if not ordered:
            pairs = sorted(zip(self.steps, self.means, strict=False))
            self.steps, self.means = [p[0] for p in pairs], [p[1] for p in pairs]
        return self.steps, self.means
