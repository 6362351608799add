"""The live training dashboard: ipywidgets + matplotlib, drawn from a `MetricStore`.

It is a cell observer: the runner's poll loop calls it while the cell runs (the kernel's
main thread is waiting on the engines anyway), and it redraws at most `refresh` times a
second by updating artists in place. When the cell ends the widget is replaced by a
static PNG, so executed notebooks show the plots on GitHub, nbviewer and under nbval.
"""

from __future__ import annotations

import io
import math
import time
from typing import Any

from nbdist.store import MetricStore

MAX_POINTS = 2000


def _thin(xs: list[float], ys: list[float]) -> tuple[list[float], list[float]]:
    step = max(1, math.ceil(len(xs) / MAX_POINTS))
    return xs[::step], ys[::step]


class Dashboard:
    """Loss per rank and mean, throughput, device load and allreduce share, with progress.

    Works from the Python API too: `pool.run(code, observers=[nbdist.Dashboard()])`.
    """

    def __init__(self, refresh: float = 1.0, keep_png: bool = True) -> None:
        self.refresh = refresh
        self.keep_png = keep_png
        self.store: MetricStore | None = None
        self.renders = 0
        self._last = 0.0
        self._figure: Any = None
        self._axes: dict[str, Any] = {}
        self._lines: dict[tuple[str, Any], Any] = {}
        self._canvas: Any = None
        self._handle: Any = None
        self._widgets: dict[str, Any] = {}
        self._throughput: list[tuple[float, float, float]] = []
        self._started = 0.0
        self._background: Any = None
        self._bars: list[Any] = []
        self._mean = _MeanLoss()
        self._finite: dict[int, _FiniteLoss] = {}
        self.full_draws = 0
        self._legend_size = 0
        self._stale: set[str] = set()
        self.partial_draws = 0

    # -- observer protocol ------------------------------------------------------------------

    def cell_started(self, store: MetricStore) -> None:
        self.store = store
        self._started = time.time()

    def _show(self) -> None:
        """Build and display the widget once the cell reports its first training record,
        so cells that report nothing get no empty dashboard."""
        import ipywidgets as widgets
        from IPython.display import display

        self._build_figure()
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
        if self._figure is None:
            if self.store is None or not self.store.train:
                return
            if getattr(self._shell(), "kernel", None) is not None:
                self._show()  # a live widget needs a kernel to talk to
            else:
                self._build_figure()
        now = time.monotonic()
        if now - self._last >= self.refresh:
            self._last = now
            self.render()

    def cell_finished(self, ok: bool) -> None:
        from IPython.display import Image, display

        if self.store is None or not self.store.train:
            return
        if self._figure is None:
            self._build_figure()
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

    # -- drawing ------------------------------------------------------------------------------
    #
    # Redrawing a whole figure (ticks, labels, titles) cost ~120 ms, taken from the same cores
    # the engines train on. So the data artists are `animated` and blitted over a cached
    # background; the background (axes, ticks, legends) is redrawn only when an axis has to
    # grow, which happens a logarithmic number of times because limits grow with headroom.

    def _build_figure(self) -> None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        # A fixed layout: constrained layout doubled the cost of every redraw.
        fig = Figure(figsize=(13, 5.6), dpi=72)
        fig.subplots_adjust(left=0.05, right=0.99, top=0.89, bottom=0.09, hspace=0.42, wspace=0.3)
        self._canvas = FigureCanvasAgg(fig)
        grid = fig.subplots(2, 3)
        names = ("loss", "throughput", "comm", "load", "memory", "steps")
        self._axes = dict(zip(names, grid.flat, strict=False))
        titles = {
            "loss": ("loss per rank and mean", "step"),
            "throughput": ("global throughput (samples/s)", "seconds"),
            "comm": ("share of time in gradient allreduce", "rank"),
            "load": ("device load (% of one core, or GPU util)", "seconds"),
            "memory": ("memory MB: GPU or RSS, model state dashed", "seconds"),
            "steps": ("steps/s (fastest rank)", "seconds"),
        }
        for name, ax in self._axes.items():
            ax.set_title(titles[name][0], fontsize=10)
            ax.set_xlabel(titles[name][1], fontsize=9)
            ax.tick_params(labelsize=8)
            ax.grid(alpha=0.3)
        self._axes["comm"].set_ylim(0, 1)
        self._figure = fig

    def _line(self, axis: str, key: Any, **style: Any) -> Any:
        line = self._lines.get((axis, key))
        if line is None:
            (line,) = self._axes[axis].plot([], [], animated=True, **style)
            self._lines[(axis, key)] = line
        return line

    def points(self, axis: str = "loss") -> int:
        """How many points the given panel plots (tests read it to see the plot grow)."""
        return sum(len(line.get_xdata()) for (name, _), line in self._lines.items() if name == axis)

    def render(self, final: bool = False) -> bytes:
        """Draw the current state: a JPEG frame while live, a tightly fitted PNG when `final`."""
        store = self.store
        assert store is not None and self._figure is not None
        t0 = self._started
        for rank, series in sorted(store.train.items()):
            steps, losses = _thin(*self._finite.setdefault(rank, _FiniteLoss()).update(series))
            self._line("loss", rank, label=f"rank {rank}", color=f"C{rank % 10}", lw=1).set_data(steps, losses)
        mean = self._mean.update(store)
        if mean[0]:
            self._line("loss", "mean", color="black", ls="--", lw=1.2, label="mean").set_data(*mean)
        samples_s, steps_s = store.throughput()
        if store.train:
            self._throughput.append((time.time() - t0, samples_s, steps_s))
            times, rates, paces = (list(c) for c in zip(*self._throughput, strict=False))
            self._line("throughput", "all", color="tab:green").set_data(*_thin(times, rates))
            self._line("steps", "all", color="tab:purple").set_data(*_thin(times, paces))
        for rank, series in sorted(store.load.items()):
            gpu, gpu_mem = series.columns["gpu_util"], series.columns["gpu_mem_mb"]
            on_gpu = any(v == v for v in gpu)
            util = gpu if on_gpu else series.columns["cpu"]
            memory = gpu_mem if on_gpu else series.columns["rss_mb"]
            xs = [t - t0 for t in series.columns["t"]]
            self._line("load", rank, label=f"rank {rank}", color=f"C{rank % 10}").set_data(*_thin(xs, util))
            self._line("memory", rank, label=f"rank {rank}", color=f"C{rank % 10}").set_data(*_thin(xs, memory))
            state = [p + g + o for p, g, o in zip(series.columns["param_mb"], series.columns["grad_mb"],
                                                   series.columns["optim_mb"], strict=False)]
            if any(v == v for v in state):  # parameters + gradients + optimizer state: what sharding divides
                self._line("memory", ("state", rank), ls="--", color=f"C{rank % 10}").set_data(*_thin(xs, state))
        self._draw_comm(store)
        self._fit_axes(final)
        frame = self._encode(final)
        if not final:
            self._update_widgets(store, frame, samples_s, steps_s)
        self.renders += 1
        return frame

    def _fit_axes(self, final: bool) -> None:
        """Grow limits in steps of 1-2-5 with headroom, so the costly background redraw
        happens a few times per run rather than every second; fit tightly at the end."""
        for name in ("loss", "throughput", "load", "memory", "steps"):
            ax = self._axes[name]
            lines = [line for (axis, _), line in self._lines.items() if axis == name]
            import numpy as np

            xs = [float(x) for line in lines for x in line.get_xdata()[-1:]]
            ys = [np.asarray(line.get_ydata(), dtype=float) for line in lines]
            ys = [y[~np.isnan(y)] for y in ys]
            ys = [y for y in ys if y.size]
            if not xs or not ys:
                continue
            x_max, lo, hi = max(xs), min(float(y.min()) for y in ys), max(float(y.max()) for y in ys)
            lo = min(lo, 0.0)  # losses, rates and loads are drawn from zero
            if name == "load":
                hi = max(hi, 100.0)  # a busy core reads 100 %; keep that visible from the start
            if final:
                ax.set_xlim(0.0, x_max * 1.02 or 1.0)
                ax.set_ylim(lo * 1.05, hi * 1.05 or 1.0)
                continue
            x0, x1 = ax.get_xlim()
            if x_max > x1 or self._background is None:
                total = self.store.total if self.store is not None and name == "loss" else None
                # Time panels open at 30 s: short cells then never pay for a redraw of their axes.
                floor = 30.0 if name != "loss" else 0.0
                ax.set_xlim(0.0, float(total) if total and total > x_max else max(floor, _nice(x_max * 3)))
                self._stale.add(name)
            y0, y1 = ax.get_ylim()
            if lo < y0 or hi > y1 or self._background is None:
                ax.set_ylim(-_nice(-lo * 1.2) if lo < 0 else 0.0, _nice(hi * 1.2))
                self._stale.add(name)
        from matplotlib.patches import Patch

        # The allreduce entries are there from the start: adding them later forced a full redraw.
        handles = [line for (axis, _), line in self._lines.items() if axis == "loss"]
        handles += [Patch(color="silver", label="compute"), Patch(color="darkred", label="allreduce")]
        if len(handles) != self._legend_size:
            # One legend for the figure, above the panels, where it never hides data.
            if self._figure.legends:
                self._figure.legends[0].remove()
            self._figure.legend(handles=handles, loc="upper center", ncol=len(handles), fontsize=8, frameon=False)
            self._legend_size = len(handles)
            self._background = None

    def _redraw_axes(self, names: list[str]) -> None:
        """Redraw the static parts of some panels only: a quarter of a full draw."""
        from matplotlib.patches import Rectangle
        from matplotlib.transforms import Bbox, IdentityTransform

        renderer = self._canvas.get_renderer()
        for name in names:
            ax = self._axes[name]
            # The panel with its title and tick labels: fixed margins (measuring the labels costs
            # more than drawing them), which the figure's spacing keeps clear of the neighbours.
            x0, y0, x1, y1 = ax.bbox.extents
            box = Bbox.from_extents(x0 - 45, y0 - 32, x1 + 12, y1 + 18)
            eraser = Rectangle((box.x0, box.y0), box.width, box.height, transform=IdentityTransform(),
                               facecolor=self._figure.get_facecolor(), edgecolor="none")
            eraser.set_figure(self._figure)
            eraser.draw(renderer)
            ax.draw(renderer)
        self._background = self._canvas.copy_from_bbox(self._figure.bbox)
        self.partial_draws += 1

    def _encode(self, final: bool) -> bytes:
        from PIL import Image

        canvas = self._canvas
        if self._background is None:
            canvas.draw()  # everything but the animated data artists
            self._background = canvas.copy_from_bbox(self._figure.bbox)
            self.full_draws += 1
        else:
            canvas.restore_region(self._background)
            if self._stale:
                self._redraw_axes(sorted(self._stale))
        self._stale.clear()
        for ax in self._axes.values():
            for artist in [*ax.get_lines(), *ax.patches]:
                if artist.get_animated():
                    ax.draw_artist(artist)
        rgba = canvas.buffer_rgba()
        image = Image.frombuffer("RGBA", (rgba.shape[1], rgba.shape[0]), rgba, "raw", "RGBA", 0, 1)
        buffer = io.BytesIO()
        if final:
            image.save(buffer, format="png", compress_level=6)
        else:
            # Live frames are JPEG: a fifth of PNG's encoding time, and replaced a second later.
            image.convert("RGB").save(buffer, format="jpeg", quality=85)
        return buffer.getvalue()

    def _draw_comm(self, store: MetricStore) -> None:
        ax = self._axes["comm"]
        ranks = sorted(store.train)
        shares = [store.comm_fraction(r) for r in ranks]
        if not any(s is not None for s in shares):
            return
        values = [s or 0.0 for s in shares]
        if len(self._bars) != 2 * len(ranks):
            for bar in self._bars:
                bar.remove()
            labels = [str(r) for r in ranks]
            compute = ax.bar(labels, [1 - v for v in values], color="silver", label="compute", animated=True)
            comm = ax.bar(labels, values, bottom=[1 - v for v in values], color="darkred",
                          label="allreduce", animated=True)
            self._bars = [*compute, *comm]
            self._background = None
        n = len(ranks)
        for i, v in enumerate(values):
            self._bars[i].set_height(1 - v)
            self._bars[n + i].set_y(1 - v)
            self._bars[n + i].set_height(v)

    def _update_widgets(self, store: MetricStore, frame: bytes, samples_s: float, steps_s: float) -> None:
        if not self._widgets:
            return
        self._widgets["image"].value = frame
        step = store.latest_step()
        text = f"{samples_s:,.0f} samples/s, {steps_s:,.1f} steps/s"
        if step is not None and store.total:
            done = min(1.0, (step + 1) / store.total)
            self._widgets["progress"].value = done
            elapsed = time.time() - self._started
            eta = elapsed * (1 - done) / done if done > 0 else float("nan")
            text = f"step {int(step) + 1}/{store.total}, ETA {eta:,.0f} s &middot; " + text
        elif step is not None:
            text = f"step {int(step) + 1} &middot; " + text
        # The plotted point count rides along, machine-readable, for browser tests and scripts.
        text += f' <span class="nbdist-points" data-points="{self.points("loss")}"></span>'
        self._widgets["label"].value = text


def _nice(value: float) -> float:
    """The smallest round number (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8 x 10^k) at or above `value`."""
    if value <= 0:
        return 1.0
    power = 10.0 ** math.floor(math.log10(value))
    return next(m * power for m in (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10) if m * power >= value * 0.9999)


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
        return _thin(self.steps, self.means)
