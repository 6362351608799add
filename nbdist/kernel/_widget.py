"""`PoolWidget`: a control panel that starts, stops and restarts a pool without typing options,
with a live table of engines. It drives the same `Pool` API as `%nbdist`.

The table refreshes from a task on the kernel's own event loop (between cells), as dask's
widgets do; `refresh()` can also be called directly.
"""

from __future__ import annotations

import asyncio
import html
from collections.abc import Callable
from typing import Any

import ipywidgets as widgets
import psutil

from nbdist._errors import NbdistError
from nbdist.backends import BACKENDS
from nbdist.kernel._pool import Pool

COLUMNS = ("rank", "host", "pid", "device", "state", "cpu %", "rss MB")


class PoolWidget(widgets.VBox):
    """Start a pool with a click; watch its engines come, fail and recover.

    By default it is bound to the notebook's `%nbdist` pool (when the extension is loaded),
    so `%%distributed` cells run on the pool it starts.
    """

    def __init__(
        self,
        pool: Pool | None = None,
        *,
        on_pool: Callable[[Pool | None], None] | None = None,
        refresh_seconds: float = 1.0,
        **kwargs: Any,
    ) -> None:
        if pool is None and on_pool is None:
            from nbdist.kernel._session import notebook_binding

            pool, on_pool = notebook_binding()
        self.pool = pool
        self._on_pool = on_pool
        self._refresh_seconds = refresh_seconds
        self._procs: dict[int, psutil.Process] = {}
        self.engines = widgets.BoundedIntText(value=2, min=1, max=512, description="engines")
        self.gpus = widgets.Text(value="auto", description="GPUs", placeholder="auto | none | all | 0,1")
        self.hosts = widgets.Text(value="", description="hosts", placeholder="this machine, or h1:2,h2:2 (SSH)")
        self.backend = widgets.Dropdown(options=sorted(BACKENDS), value="torch", description="backend")
        self.start_button = widgets.Button(description="Start", button_style="success", icon="play")
        self.stop_button = widgets.Button(description="Stop", button_style="danger", icon="stop")
        self.restart_button = widgets.Button(description="Restart", button_style="warning", icon="refresh")
        self.message = widgets.HTML()
        self.table = widgets.HTML()
        self.start_button.on_click(lambda _: self._act(self.start))
        self.stop_button.on_click(lambda _: self._act(self.stop))
        self.restart_button.on_click(lambda _: self._act(self.restart))
        super().__init__(
            children=[
                widgets.HBox([self.engines, self.gpus]),
                widgets.HBox([self.hosts, self.backend]),
                widgets.HBox([self.start_button, self.stop_button, self.restart_button]),
                self.message,
                self.table,
            ],
            **kwargs,
        )
        self.refresh()
        self._task = self._schedule()

    # -- actions (the buttons call these; so can code) --------------------------------------

    def start(self) -> Pool:
        if self.pool is not None and self.pool.is_running:
            raise NbdistError("a pool is already running: Stop or Restart it.")
        gpus = None if self.gpus.value.strip() in ("", "auto") else self.gpus.value.strip()
        hosts = self.hosts.value.strip() or None
        # With hosts, their counts decide the number of engines.
        pool = Pool(None if hosts else int(self.engines.value), gpus=gpus, hosts=hosts)
        self._say(f"starting {pool.config.n} engines...")
        self.pool = pool.start()
        if self._on_pool is not None:
            self._on_pool(self.pool)
        self._say(self.pool.summary())
        return self.pool

    def stop(self) -> None:
        if self.pool is None or not self.pool.is_running:
            raise NbdistError("no pool is running: click Start.")
        self.pool.stop()
        self._say("pool stopped")

    def restart(self) -> None:
        if self.pool is None or not self.pool.is_running:
            raise NbdistError("no pool is running: click Start.")
        self._say("restarting engines...")
        self.pool.restart()
        self._say("fresh engines ready (engine state was cleared)")

    def _act(self, action: Callable[[], Any]) -> None:
        for button in (self.start_button, self.stop_button, self.restart_button):
            button.disabled = True
        try:
            action()
        except Exception as exc:  # noqa: BLE001 - a panel shows errors, it does not raise them
            self._say(f"<b>error:</b> {html.escape(str(exc))}")
        finally:
            for button in (self.start_button, self.stop_button, self.restart_button):
                button.disabled = False
            self.refresh()

    def _say(self, text: str) -> None:
        self.message.value = text

    # -- the live table ----------------------------------------------------------------------

    def rows(self) -> list[dict[str, Any]]:
        """One row per engine: rank, host, pid, device, state and current load."""
        if self.pool is None or not self.pool.is_running:
            return []
        rows = []
        here = not self.pool.config.launch.remote  # a PID on another host is not a process here
        for status in self.pool.status():
            alive = here and not status.state.startswith("dead")
            cpu, rss = self._load(status.pid) if alive else (None, None)
            rows.append({"rank": status.rank, "host": status.host, "pid": status.pid,
                         "device": status.device, "state": status.state, "cpu %": cpu, "rss MB": rss})
        return rows

    def _load(self, pid: int) -> tuple[float | None, float | None]:
        try:
            process = self._procs.get(pid)
            if process is None:
                process = self._procs[pid] = psutil.Process(pid)
                process.cpu_percent(None)
            return round(process.cpu_percent(None), 1), round(process.memory_info().rss / 2**20, 1)
        except psutil.Error:
            return None, None

    def refresh(self) -> None:
        rows = self.rows()
        if not rows:
            self.table.value = "<i>no engines: choose the options and click Start</i>"
            return
        head = "".join(f"<th style='padding:0 8px'>{c}</th>" for c in COLUMNS)
        body = "".join(
            "<tr>" + "".join(f"<td style='padding:0 8px'>{html.escape(str(r[c] if r[c] is not None else '-'))}</td>"
                             for c in COLUMNS) + "</tr>"
            for r in rows
        )
        self.table.value = f"<table class='nbdist-engines'><tr>{head}</tr>{body}</table>"

    def _schedule(self) -> asyncio.Task[None] | None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no event loop (a script or a plain shell): refresh() on demand
            return None
        return loop.create_task(self._refresh_forever())

    async def _refresh_forever(self) -> None:
        while self.comm is not None:  # stops when the widget is closed
            await asyncio.sleep(self._refresh_seconds)
            try:
                self.refresh()
            except Exception as exc:  # noqa: BLE001 - keep the panel alive; show what went wrong
                self._say(f"<b>refresh failed:</b> {html.escape(str(exc))}")
