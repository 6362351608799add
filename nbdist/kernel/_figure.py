"""The dashboard's picture: matplotlib (Agg) drawing of a prepared `Frame`, nothing else.

Kept apart from the observer so that drawing can run on a low-priority thread: a `Frame`
holds copies of the data, and the figure is touched by one thread at a time.

Redrawing a whole figure (ticks, labels, titles) costs ~100 ms, taken from the same cores
the engines train on. So the data artists are `animated` and blitted over a cached
background; the background (axes, ticks, legends) is redrawn, panel by panel, only when an
axis has to grow, which happens a logarithmic number of times because limits grow with
headroom. One figure serves cell after cell (`new_run`): a new cell redraws only the panels
whose opening limits differ from the last cell's, where a new figure cost a build and a full
draw per cell.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from typing import Any

PANELS = {
    "loss": ("loss per rank and mean", "step"),
    "throughput": ("global throughput (samples/s)", "seconds"),
    "comm": ("share of time communicating", "rank"),
    "load": ("device load (% of one core, or GPU util)", "seconds"),
    "memory": ("memory MB (GPU, or process RSS)", "seconds"),
    "steps": ("steps/s (fastest rank)", "seconds"),
}
GROWING = tuple(name for name in PANELS if name != "comm")  # panels whose limits follow the data
LABEL_BELOW = -0.15  # x labels' top, in axes heights below the axis: clear of 8 pt tick labels


@dataclass(frozen=True)
class Line:
    xs: list[float]
    ys: list[float]
    style: dict[str, Any]


@dataclass
class Frame:
    """What one picture shows, detached from the live metric store."""

    lines: dict[tuple[str, Any], Line] = field(default_factory=dict)
    comm: list[tuple[str, float]] = field(default_factory=list)  # (rank label, communication share)
    total: int | None = None  # steps in the run, when the cell said
    notes: dict[str, str] = field(default_factory=dict)  # panel -> a line of text drawn in it

    def points(self, axis: str) -> int:
        return sum(len(line.xs) for (name, _), line in self.lines.items() if name == axis)


class DashboardFigure:
    """Six panels drawn into an Agg canvas; `draw` returns JPEG (live) or PNG (final) bytes."""

    def __init__(self) -> None:
        self.full_draws = 0
        self.partial_draws = 0
        self.axes: dict[str, Any] = {}
        self._figure: Any = None
        self._canvas: Any = None
        self._lines: dict[tuple[str, Any], Any] = {}
        self._bars: list[Any] = []
        self._notes: dict[str, Any] = {}
        self._background: Any = None
        self._legend: tuple[str, ...] = ()  # labels of the legend's run lines
        self._stale: set[str] = set()  # panels whose static parts must be redrawn
        self._opening: set[str] = set(GROWING)  # panels whose limits the next frame sets afresh

    def new_run(self) -> None:
        """Clear the data for another cell, keeping the drawn axes: its first frame then costs
        a redraw of the panels whose limits change, not a new figure's full draw."""
        for artist in self._lines.values():
            artist.set_data([], [])
        for bar in self._bars:
            bar.set_height(0.0)
        for name in self._notes:
            self._note(name, "")
        self._opening = set(GROWING)

    def _build(self) -> None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        # A fixed layout: constrained layout doubled the cost of every redraw.
        fig = Figure(figsize=(13, 5.6), dpi=72)
        fig.subplots_adjust(left=0.05, right=0.99, top=0.89, bottom=0.09, hspace=0.42, wspace=0.3)
        self._canvas = FigureCanvasAgg(fig)
        grid = fig.subplots(2, 3)
        self.axes = dict(zip(PANELS, grid.flat, strict=False))
        for name, ax in self.axes.items():
            title, xlabel = PANELS[name]
            # Fixed places for titles and axis labels, and fewer ticks: placing them from the
            # measured tick labels was a third of every full draw (~160 -> ~95 ms, 2 cores).
            ax.set_title(title, fontsize=10, y=1.0)
            ax.set_xlabel(xlabel, fontsize=9)
            ax.xaxis.set_label_coords(0.5, LABEL_BELOW)
            ax.yaxis.set_label_coords(0.0, 0.5)  # no y label; fixed so it is never measured
            ax.locator_params(nbins=4)
            ax.tick_params(labelsize=8)
            ax.grid(alpha=0.3)
        self.axes["comm"].set_ylim(0, 1)
        self.axes["comm"].set_xticks([])  # no ranks until shares arrive (else -0.05 .. 0.05)
        for name in ("memory", "comm"):
            # Figures read as numbers: model state is a few MB beside hundreds of MB of process
            # memory, invisible as a line on the same axis, so it is written, per rank. A note
            # is part of its panel's background, redrawn only when its words change: drawn
            # with every frame, the two notes' glyphs were 30 of a frame's 37 ms.
            self._notes[name] = self.axes[name].text(
                0.02, 0.04, "", transform=self.axes[name].transAxes, va="bottom", ha="left", fontsize=8,
                bbox=dict(facecolor="white", alpha=0.8, edgecolor="none", pad=1.5))
        self._figure = fig

    def draw(self, frame: Frame, final: bool = False) -> bytes:
        if self._figure is None:
            self._build()
        for key, line in frame.lines.items():
            artist = self._lines.get(key)
            if artist is None:
                (artist,) = self.axes[key[0]].plot([], [], animated=True, **line.style)
                self._lines[key] = artist
            artist.set_data(line.xs, line.ys)
        self._draw_comm(frame.comm)
        for name in self._notes:
            self._note(name, frame.notes.get(name, ""))
        legend = [self._lines[key] for key in frame.lines if key[0] == "loss"]
        if not final:
            self._fit_axes(frame.total)
            self._fit_legend(legend)
            return self._encode(final)
        # The PNG that stays in the notebook: drawn from scratch with tight limits (a blit over
        # the live background would keep the live frames' tick labels). The live limits and
        # background are put back afterwards, for the next cell's frames to start from.
        live = self._background, {name: (ax.get_xlim(), ax.get_ylim()) for name, ax in self.axes.items()}
        legend_live = self._legend
        self._background = None
        self._fit_tight()
        self._fit_legend(legend)
        picture = self._encode(final)
        self._background, limits = live
        if self._legend != legend_live:
            self._background = None  # the live background shows the legend before this one
        for name, (xlim, ylim) in limits.items():
            self.axes[name].set_xlim(xlim)
            self.axes[name].set_ylim(ylim)
        return picture

    def _data_range(self, name: str) -> tuple[float, float, float, float] | None:
        """(first x, last x, lowest y, highest y) of a panel's lines, None while it has no data."""
        import numpy as np

        lines = [line for (axis, _), line in self._lines.items() if axis == name]
        xs = [float(x) for line in lines for x in line.get_xdata()[-1:]]
        first = min((float(x) for line in lines for x in line.get_xdata()[:1]), default=0.0)
        ys = [np.asarray(line.get_ydata(), dtype=float) for line in lines]
        ys = [y[~np.isnan(y)] for y in ys]
        ys = [y for y in ys if y.size]
        if not xs or not ys:
            return None
        lo = min(0.0, min(float(y.min()) for y in ys))  # losses, rates and loads are drawn from zero
        hi = max(float(y.max()) for y in ys)
        if name == "load":
            hi = max(hi, 100.0)  # a busy core reads 100 %; keep that visible from the start
        return first, max(xs), lo, hi

    def _fit_axes(self, total: int | None) -> None:
        """Grow limits in steps of 1-2-5 with headroom, so the costly background redraw
        happens a few times per run rather than every second."""
        for name in GROWING:
            ax = self.axes[name]
            data = self._data_range(name)
            if data is None:
                continue
            _, x_max, lo, hi = data
            opening = name in self._opening or self._background is None
            self._opening.discard(name)
            if opening or x_max > ax.get_xlim()[1]:
                steps = total if name == "loss" else None
                # Time panels open at 30 s: short cells then never pay for a redraw of their axes.
                floor = 30.0 if name != "loss" else 0.0
                x1 = float(steps) if steps and steps > x_max else max(floor, _nice(x_max * 3))
                self._limit(name, ax.set_xlim, ax.get_xlim(), (0.0, x1))
            y0, y1 = ax.get_ylim()
            if opening or lo < y0 or hi > y1:
                self._limit(name, ax.set_ylim, (y0, y1), (-_nice(-lo * 1.2) if lo < 0 else 0.0, _nice(hi * 1.2)))

    def _note(self, name: str, text: str) -> None:
        note = self._notes[name]
        if note.get_text() != text:
            note.set_text(text)
            self._stale.add(name)

    def _limit(self, name: str, setter: Any, old: tuple[float, float], new: tuple[float, float]) -> None:
        if tuple(old) != new:
            setter(new)
            self._stale.add(name)

    def _fit_tight(self) -> None:
        for name in GROWING:
            ax = self.axes[name]
            data = self._data_range(name)
            if data is None:  # nothing this cell: an empty panel, not the last cell's axes
                ax.set_xlim(0.0, 1.0)
                ax.set_ylim(0.0, 1.0)
                continue
            first, x_max, lo, hi = data
            # Time panels span the data, not the cell from 0: a short cell's first measurement
            # comes a second or so in, and would leave the left of the panel empty.
            x_min = 0.0 if name == "loss" else first
            pad = (x_max - x_min) * 0.02
            ax.set_xlim(x_min - pad, x_max + pad if x_max > x_min else x_min + 1.0)
            ax.set_ylim(lo * 1.05, hi * 1.05 or 1.0)

    def _fit_legend(self, lines: list[Any]) -> None:
        """One legend for the figure, above the panels, where it never hides data. The
        compute/communication entries are there from the start: adding them later forced a full redraw."""
        from matplotlib.patches import Patch

        labels = tuple(str(line.get_label()) for line in lines)
        if labels == self._legend:
            return
        if self._figure.legends:
            self._figure.legends[0].remove()
        handles = [*lines, Patch(color="silver", label="compute"), Patch(color="darkred", label="communication")]
        self._figure.legend(handles=handles, loc="upper center", ncol=len(handles), fontsize=8, frameon=False)
        self._legend = labels
        self._background = None

    def _redraw_axes(self, names: list[str]) -> None:
        """Redraw the static parts of some panels only: a quarter of a full draw."""
        from matplotlib.patches import Rectangle
        from matplotlib.transforms import Bbox, IdentityTransform

        renderer = self._canvas.get_renderer()
        for name in names:
            ax = self.axes[name]
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
        for ax in self.axes.values():
            for artist in [*ax.get_lines(), *ax.patches, *ax.texts]:
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

    def _draw_comm(self, comm: list[tuple[str, float]]) -> None:
        if not comm:
            return
        ax = self.axes["comm"]
        labels = [label for label, _ in comm]
        values = [share for _, share in comm]
        if len(self._bars) != 2 * len(comm):
            for bar in self._bars:
                bar.remove()
            compute = ax.bar(labels, [1 - v for v in values], color="silver", label="compute", animated=True)
            allreduce = ax.bar(labels, values, bottom=[1 - v for v in values], color="darkred",
                               label="communication", animated=True)
            self._bars = [*compute, *allreduce]
            ax.set_xticks(range(len(labels)), labels)
            ax.set_xlim(-0.5, len(labels) - 0.5)
            self._stale.add("comm")  # its rank labels are new
        n = len(comm)
        for i, v in enumerate(values):
            self._bars[i].set_height(1 - v)
            self._bars[n + i].set_y(1 - v)
            self._bars[n + i].set_height(v)


def _nice(value: float) -> float:
    """The smallest round number (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8 x 10^k) at or above `value`."""
    if value <= 0:
        return 1.0
    power = 10.0 ** math.floor(math.log10(value))
    return next(m * power for m in (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10) if m * power >= value * 0.9999)
