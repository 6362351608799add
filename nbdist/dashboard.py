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
        self._throughput: list[tuple[float, float]] = []
        self._started = 0.0

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
            "image": widgets.Image(format="png", layout=widgets.Layout(max_width="900px")),
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
        png = self.render()
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

    def _build_figure(self) -> None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        # A fixed layout: constrained layout doubled the cost of every redraw.
        fig = Figure(figsize=(10, 5.6), dpi=72)
        fig.subplots_adjust(left=0.07, right=0.98, top=0.94, bottom=0.09, hspace=0.42, wspace=0.18)
        self._canvas = FigureCanvasAgg(fig)
        grid = fig.subplots(2, 2)
        names = ("loss", "throughput", "load", "comm")
        self._axes = dict(zip(names, grid.flat, strict=False))
        titles = {
            "loss": ("loss per rank (mean dashed)", "step"),
            "throughput": ("global throughput (samples/s)", "seconds"),
            "load": ("device load (% of one core or GPU util)", "seconds"),
            "comm": ("share of time in gradient allreduce", "rank"),
        }
        for name, ax in self._axes.items():
            ax.set_title(titles[name][0], fontsize=10)
            ax.set_xlabel(titles[name][1], fontsize=9)
            ax.tick_params(labelsize=8)
            ax.grid(alpha=0.3)
        self._figure = fig

    def _line(self, axis: str, key: Any, **style: Any) -> Any:
        line = self._lines.get((axis, key))
        if line is None:
            (line,) = self._axes[axis].plot([], [], **style)
            self._lines[(axis, key)] = line
        return line

    def points(self, axis: str = "loss") -> int:
        """How many points the given panel plots (tests read it to see the plot grow)."""
        return sum(len(line.get_xdata()) for (name, _), line in self._lines.items() if name == axis)

    def render(self) -> bytes:
        store = self.store
        assert store is not None and self._figure is not None
        t0 = self._started
        for rank, series in sorted(store.train.items()):
            steps, losses = _thin(series.columns["step"], series.columns["loss"])
            self._line("loss", rank, label=f"rank {rank}", lw=1).set_data(steps, losses)
        mean = self._mean_loss(store)
        if mean[0]:
            self._line("loss", "mean", color="black", ls="--", lw=1.2, label="mean").set_data(*mean)
        samples_s, steps_s = store.throughput()
        if store.train:
            self._throughput.append((time.time() - t0, samples_s))
            times, rates = zip(*self._throughput, strict=False)
            self._line("throughput", "all", color="tab:green").set_data(times, rates)
        for rank, series in sorted(store.load.items()):
            gpu = series.columns["gpu_util"]
            util = gpu if any(v == v for v in gpu) else series.columns["cpu"]
            xs = [t - t0 for t in series.columns["t"]]
            self._line("load", rank, label=f"rank {rank}").set_data(xs, util)
        self._draw_comm(store)
        for name, ax in self._axes.items():
            if name != "comm":
                ax.relim()
                ax.autoscale_view()
            legend = ax.get_legend()
            lines = ax.get_lines()
            if name in ("loss", "load") and lines and (legend is None or len(legend.get_lines()) != len(lines)):
                ax.legend(fontsize=8, loc="upper right")
        png = self._png()
        self._update_widgets(store, png, samples_s, steps_s)
        self.renders += 1
        return png

    def _png(self) -> bytes:
        from PIL import Image

        self._canvas.draw()
        rgba = self._canvas.buffer_rgba()
        buffer = io.BytesIO()
        Image.frombuffer("RGBA", (rgba.shape[1], rgba.shape[0]), rgba, "raw", "RGBA", 0, 1).save(
            buffer, format="png", compress_level=1
        )
        return buffer.getvalue()

    @staticmethod
    def _mean_loss(store: MetricStore) -> tuple[list[float], list[float]]:
        by_step: dict[float, list[float]] = {}
        for series in store.train.values():
            for step, loss in zip(series.columns["step"], series.columns["loss"], strict=False):
                if loss == loss:
                    by_step.setdefault(step, []).append(loss)
        ranks = len(store.train)
        steps = sorted(s for s, v in by_step.items() if len(v) == ranks)
        return _thin(steps, [sum(by_step[s]) / ranks for s in steps])

    def _draw_comm(self, store: MetricStore) -> None:
        ax = self._axes["comm"]
        ranks = sorted(store.train)
        shares = [store.comm_fraction(r) for r in ranks]
        if not any(s is not None for s in shares):
            return
        ax.clear()
        ax.set_title("share of time in gradient allreduce", fontsize=10)
        values = [s or 0.0 for s in shares]
        ax.bar([str(r) for r in ranks], [1 - v for v in values], color="tab:blue", label="compute")
        ax.bar([str(r) for r in ranks], values, bottom=[1 - v for v in values], color="tab:orange",
               label="allreduce")
        ax.set_ylim(0, 1)
        ax.set_xlabel("rank", fontsize=9)
        ax.legend(fontsize=8, loc="lower right")

    def _update_widgets(self, store: MetricStore, png: bytes, samples_s: float, steps_s: float) -> None:
        if not self._widgets:
            return
        self._widgets["image"].value = png
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
        self._widgets["label"].value = text
