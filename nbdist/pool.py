"""`Pool`: a persistent set of ipyparallel engines that form one distributed job.

This is the product; `%nbdist`, `%%distributed` and the widgets are thin views on it.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from types import TracebackType
from typing import TYPE_CHECKING, Any

import ipyparallel as ipp
import psutil
from traitlets.config import Config

from nbdist import engine as engine_side
from nbdist import guard
from nbdist.backends import BACKENDS, Formation, RankInfo, check_choice
from nbdist.config import PoolConfig, resolve_config
from nbdist.errors import ConfigError, PoolStartError, PoolStateError
from nbdist.history import History

if TYPE_CHECKING:
    from nbdist.runner import CellResult

LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class EngineInfo:
    """One engine as the pool knows it."""

    rank: int
    engine_id: int
    host: str
    pid: int
    gpu: str | None
    device: str


@dataclass(frozen=True)
class EngineStatus:
    rank: int
    engine_id: int
    host: str
    pid: int
    device: str
    state: str
    """`idle`, `busy` or `dead (...)`."""


@dataclass(frozen=True)
class EngineExit:
    rank: int
    host: str
    pid: int
    exit_code: int | None

    def describe(self) -> str:
        code = self.exit_code
        if code is None:
            how = "exited"
        elif code < 0:
            try:
                how = f"was killed by {signal.Signals(-code).name}"
            except ValueError:
                how = f"was killed by signal {-code}"
        else:
            how = f"exited with code {code}"
        return f"rank {self.rank} (engine pid {self.pid} on {self.host}) {how}"


class Pool:
    """A pool of engines that keeps its processes, and their process group, between cells.

    >>> with Pool(n=2) as pool:
    ...     pool.run("import torch.distributed as dist; dist.get_world_size()").value
    2
    """

    def __init__(
        self,
        n: int | None = None,
        *,
        gpus: str | tuple[str, ...] | None = None,
        start_timeout: float = 60.0,
        grace: float = 2.0,
        config: PoolConfig | None = None,
    ) -> None:
        self.config = config or resolve_config(n, gpus, start_timeout=start_timeout, grace=grace)
        self.history = History()
        self._cluster: ipp.Cluster | None = None
        self._client: ipp.Client | None = None
        self._engines: tuple[EngineInfo, ...] = ()
        self._views: tuple[Any, ...] = ()
        self._procs: dict[int, psutil.Process] = {}
        self._backend: str | None = None
        self._formation = Formation("")
        self._cells = 0
        self.log = logging.getLogger("nbdist")

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def is_running(self) -> bool:
        return self._cluster is not None

    def start(self) -> Pool:
        """Start the controller and engines, and wait until every engine has registered."""
        if self._cluster is not None:
            raise PoolStateError("the pool is already running: use restart() or stop() first.")
        cfg = self.config
        launch = Config()
        launch.ControllerLauncher.controller_cmd = guard.command(os.getpid(), "ipyparallel.controller")
        launch.EngineLauncher.engine_cmd = guard.command(os.getpid(), "ipyparallel.engine")
        cluster = ipp.Cluster(
            config=launch,
            n=cfg.n,
            cluster_id=f"nbdist-{uuid.uuid4().hex[:8]}",
            controller_ip=LOOPBACK,
            engine_timeout=int(cfg.start_timeout),
            delay=0.0,
            log_level=logging.ERROR,
        )
        self._cluster = cluster
        try:
            cluster.start_controller_sync()
            self._client = cluster.connect_client_sync()
            self._launch_engines(known=set())
        except BaseException as exc:
            self.stop()
            if isinstance(exc, Exception):
                raise PoolStartError(f"the pool did not start: {exc}") from exc
            raise
        return self

    def _launch_engines(self, known: set[int]) -> None:
        """Start `n` engines and adopt them: wait for registration, pin GPUs, assign ranks."""
        cluster, client, cfg = self._cluster, self._client, self.config
        assert cluster is not None and client is not None
        threads = str(cfg.threads_per_engine)
        cluster.start_engines_sync(
            cfg.n, environment={name: threads for name in engine_side.THREAD_VARIABLES}
        )
        new_ids = self._wait_for_new_engines(known, cfg.n, cfg.start_timeout)
        client[new_ids].use_cloudpickle()
        # Engines register in launch order; GPU i goes to the i-th engine.
        slots = [cfg.gpus[i] if cfg.uses_gpus else None for i in range(cfg.n)]
        pending = [
            client[eid].apply_async(engine_side.describe, slots[i], cfg.threads_per_engine)
            for i, eid in enumerate(new_ids)
        ]
        facts = [ar.get(timeout=cfg.start_timeout) for ar in pending]
        order = sorted(range(cfg.n), key=lambda i: (facts[i].host, i))
        self._engines = tuple(
            EngineInfo(
                rank=rank,
                engine_id=new_ids[i],
                host=facts[i].host,
                pid=facts[i].pid,
                gpu=slots[i],
                device=f"cuda:{slots[i]}" if slots[i] is not None else "cpu",
            )
            for rank, i in enumerate(order)
        )
        self._views = tuple(client[e.engine_id] for e in self._engines)
        self._procs = self._find_processes()
        self._backend = None

    def _wait_for_new_engines(self, known: set[int], n: int, timeout: float) -> list[int]:
        client = self._client
        assert client is not None
        deadline = time.monotonic() + timeout
        while True:
            fresh = sorted(set(client.ids) - known)
            if len(fresh) >= n:
                return fresh[:n]
            if time.monotonic() > deadline:
                raise PoolStartError(
                    f"only {len(fresh)} of {n} engines registered within {timeout:.0f} s; "
                    "see the engine logs in the ipyparallel profile's log folder."
                )
            time.sleep(0.02)

    def _find_processes(self) -> dict[int, psutil.Process]:
        """The launcher's process handles, by rank: they know the exit code once reaped."""
        assert self._cluster is not None
        by_pid: dict[int, psutil.Process] = {}
        for engine_set in self._cluster.engines.values():
            for launcher in getattr(engine_set, "launchers", {}).values():
                process = getattr(launcher, "process", None)
                if isinstance(process, psutil.Process):
                    by_pid[process.pid] = process
        return {e.rank: by_pid[e.pid] for e in self._engines if e.pid in by_pid}

    def stop(self) -> None:
        """Stop every engine and the controller; safe to call twice."""
        cluster, client = self._cluster, self._client
        self._cluster, self._client = None, None
        self._engines, self._views, self._procs, self._backend = (), (), {}, None
        if client is not None:
            client.close()
        if cluster is not None:
            try:
                cluster.stop_cluster_sync()
            finally:
                _reap_stragglers(cluster)

    def restart(self) -> None:
        """Fresh engines (all engine state is lost); the process group is re-formed on next use."""
        self._require_running()
        self.recover()

    def recover(self) -> float:
        """Kill every engine, start new ones and adopt them. Returns the seconds it took."""
        started = time.monotonic()
        cluster = self._cluster
        assert cluster is not None and self._client is not None
        known = set(self._client.ids) | {e.engine_id for e in self._engines}
        for process in self._procs.values():
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        cluster.stop_engines_sync()
        self._launch_engines(known)
        return time.monotonic() - started

    def __enter__(self) -> Pool:
        if not self.is_running:
            self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- inspection ------------------------------------------------------------------------

    def _require_running(self) -> None:
        if self._cluster is None:
            raise PoolStateError("no pool is running: start one with `%nbdist start` or Pool.start().")

    @property
    def engines(self) -> tuple[EngineInfo, ...]:
        return self._engines

    @property
    def views(self) -> tuple[Any, ...]:
        """One ipyparallel DirectView per rank, in rank order."""
        self._require_running()
        return self._views

    @property
    def backend(self) -> str | None:
        return self._backend

    def exits(self) -> list[EngineExit]:
        """Engines whose process has ended, with how it ended."""
        ended = []
        for engine in self._engines:
            process = self._procs.get(engine.rank)
            if process is None:
                continue
            ended_with = _exit_status(process)
            if ended_with is not _RUNNING:
                ended.append(EngineExit(engine.rank, engine.host, engine.pid, ended_with))
        return ended

    def status(self) -> list[EngineStatus]:
        self._require_running()
        assert self._client is not None
        dead = {x.rank: x for x in self.exits()}
        registered = set(self._client.ids)
        alive = [e.engine_id for e in self._engines if e.rank not in dead and e.engine_id in registered]
        queue = self._client.queue_status(targets=alive) if alive else {}
        rows = []
        for e in self._engines:
            if e.rank in dead:
                code = dead[e.rank].exit_code
                state = f"dead (exit {code})"
            else:
                busy = queue.get(e.engine_id, {}).get("tasks", 0) if isinstance(queue, dict) else 0
                state = "busy" if busy else "idle"
            rows.append(EngineStatus(e.rank, e.engine_id, e.host, e.pid, e.device, state))
        return rows

    # -- data in and out -------------------------------------------------------------------

    def push(self, namespace: Mapping[str, Any]) -> None:
        """Copy notebook values to every engine."""
        self._require_running()
        assert self._client is not None
        self._client[[e.engine_id for e in self._engines]].push(dict(namespace), block=True)

    def pull(self, name: str, rank: int = 0) -> Any:
        """A value from one rank (parallel wrappers removed, tensors on the CPU)."""
        self._require_running()
        if not isinstance(rank, int) or not 0 <= rank < len(self._engines):
            raise ConfigError(f"--rank {rank!r} is out of range: ranks are 0..{len(self._engines) - 1}.")
        value = self._views[rank].apply_sync(engine_side.export, name)
        if isinstance(value, engine_side.CollectiveExport):  # sharded: every rank gathers it together
            from nbdist.runner import gather_or_fail

            pending = [view.apply_async(engine_side.export, name, True, r == rank)
                       for r, view in enumerate(self._views)]
            gathered = gather_or_fail(self, pending, what=f"gathering {name}", timeout=self.config.start_timeout)
            value = gathered[rank]
        return value

    def memory(self, timeout: float = 5.0) -> list[dict[str, float]]:
        """Per rank: parameter, gradient and optimizer-state MB held (what sharding divides);
        empty for a rank that is dead or does not answer within `timeout`."""
        self._require_running()
        dead = {x.rank for x in self.exits()}
        pending = {r: v.apply_async(engine_side.memory) for r, v in enumerate(self._views) if r not in dead}
        rows: list[dict[str, float]] = []
        for rank in range(len(self._views)):
            try:
                rows.append(pending[rank].get(timeout=timeout) if rank in pending else {})
            except Exception:  # noqa: BLE001 - a busy or failing engine: no figure rather than a hang
                rows.append({})
        return rows

    # -- running code ----------------------------------------------------------------------

    def ensure_backend(self, backend: str, formation: Formation | None = None) -> None:
        """Form the backend's process group on first use; it then lives as long as the engines.

        A pool serves one backend (and, for TensorFlow, one strategy) at a time: frameworks
        cannot leave a group and join another in the same process."""
        self._require_running()
        spec = BACKENDS[backend]
        formation = formation or spec.formation(spec.default_strategy)
        if self._backend == backend and self._formation == formation:
            return
        if self._backend is not None:
            now = self._backend
            if BACKENDS[now].formed_per_strategy:
                now += f" --strategy {self._formation.strategy}"
            raise PoolStateError(
                f"this pool's engines are joined for {now}; {backend} --strategy {formation.strategy} needs "
                f"fresh engines: add --restart to the cell (or run `%nbdist restart`; engine state is cleared)."
            )
        if formation.strategy == "ps":
            self._check_ps(formation.ps)
        port = self._views[0].apply_sync(engine_side.free_port, LOOPBACK)
        peers: tuple[str, ...] = ()
        if spec.needs_peers:
            from nbdist.runner import gather_or_fail

            asks = [v.apply_async(engine_side.free_port, LOOPBACK) for v in self._views]
            if formation.strategy == "ps" and len(self._views) - 1 - formation.ps == 0:
                # No engine is left for a worker: the coordinator's engine hosts one (its own port).
                asks.append(self._views[0].apply_async(engine_side.free_port, LOOPBACK))
            ports = gather_or_fail(self, asks, what="choosing ports", timeout=self.config.start_timeout)
            peers = tuple(f"{LOOPBACK}:{p}" for p in ports)
        infos = [replace(i, peers=peers) for i in self.rank_infos(master_addr=LOOPBACK, master_port=port)]
        pending = [
            view.apply_async(engine_side.join, info, backend, formation)
            for view, info in zip(self._views, infos, strict=True)
        ]
        from nbdist.runner import gather_or_fail

        devices = gather_or_fail(self, pending, what=f"forming the {backend} process group",
                                 timeout=self.config.start_timeout)
        self._engines = tuple(replace(e, device=str(d)) for e, d in zip(self._engines, devices, strict=False))
        self._backend = backend
        self._formation = formation

    def _check_ps(self, ps: int) -> None:
        n = len(self._engines)
        if not 1 <= ps <= n - 1:
            raise ConfigError(
                f"--ps {ps} does not fit {n} engines: one engine is the coordinator, so choose 1 to {n - 1} "
                f"parameter servers (and start more engines for dedicated workers)."
            )

    def rank_infos(self, master_addr: str, master_port: int) -> list[RankInfo]:
        hosts = list(dict.fromkeys(e.host for e in self._engines))
        infos = []
        for e in self._engines:
            same_host = [o for o in self._engines if o.host == e.host]
            infos.append(
                RankInfo(
                    rank=e.rank,
                    local_rank=same_host.index(e),
                    world_size=len(self._engines),
                    local_world_size=len(same_host),
                    node_rank=hosts.index(e.host),
                    master_addr=master_addr,
                    master_port=master_port,
                    gpu=e.gpu,
                    threads=self.config.threads_per_engine,
                )
            )
        return infos

    def next_cell_id(self) -> str:
        self._cells += 1
        return str(self._cells)

    def run(
        self,
        source: str,
        *,
        backend: str = "torch",
        strategy: str | None = None,
        ps: int = 1,
        restart: bool = False,
        output: str = "rank0",
        timeout: float | None = None,
        observers: Iterable[Any] = (),
        line_offset: int = 0,
    ) -> CellResult:
        """Run `source` on every rank and return rank 0's last-expression value and outputs.

        `ps` is the number of parameter servers for TensorFlow's `ps` strategy. `restart`
        gives the pool fresh engines first when they are joined for another backend or
        strategy (engine state is lost, so it is never done without being asked)."""
        strategy = check_choice(backend, strategy)
        formation = BACKENDS[backend].formation(strategy, ps if strategy == "ps" else 0)
        if restart and self._backend is not None and (self._backend, self._formation) != (backend, formation):
            was = f"{self._backend} --strategy {self._formation.strategy}"
            self.restart()
            print(f"nbdist: engines restarted to switch from {was} to {backend} --strategy {strategy} "
                  "(engine state was cleared).", file=sys.stderr)
        from nbdist.runner import CellRunner

        return CellRunner(self, output=output, observers=list(observers)).run(
            source, backend=backend, strategy=strategy, formation=formation, timeout=timeout,
            line_offset=line_offset,
        )

    def __repr__(self) -> str:
        state = f"{len(self._engines)} engines, backend {self._backend}" if self.is_running else "stopped"
        return f"<nbdist.Pool {state}>"


_RUNNING = object()


def _exit_status(process: psutil.Process) -> Any:
    """The exit code of an engine we launched (negative: killed by that signal), or _RUNNING.

    The launcher's own thread reaps the process; peeking with WNOWAIT leaves the zombie
    to it, so the two never race for the status (the loser of a race would get None)."""
    try:
        info = os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:  # already reaped by the launcher, which cached the code
        try:
            code = process.wait(timeout=0)
            return None if code is None else int(code)
        except psutil.TimeoutExpired:
            return _RUNNING
    if info is None:
        return _RUNNING
    if info.si_code in (os.CLD_KILLED, os.CLD_DUMPED):
        return -info.si_status
    return info.si_status


def _reap_stragglers(cluster: ipp.Cluster) -> None:
    """Kill any engine or controller process a failed stop left behind (tracked PIDs only)."""
    handles: list[Any] = []
    for engine_set in list(cluster.engines.values()):
        handles.extend(getattr(engine_set, "launchers", {}).values())
    if cluster.controller is not None:
        handles.append(cluster.controller)
    for launcher in handles:
        process = getattr(launcher, "process", None)
        if isinstance(process, psutil.Process) and process.is_running():
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
