"""`Pool`: a persistent set of ipyparallel engines that form one distributed job.

This is the product; `%nbdist`, `%%distributed` and the widgets are thin views on it.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from types import TracebackType
from typing import TYPE_CHECKING, Any, cast

import ipyparallel as ipp
import psutil
from traitlets.config import Config

from nbdist import engine as engine_side
from nbdist import guard
from nbdist.backends import BACKENDS, Formation, RankInfo, check_choice
from nbdist.config import PoolConfig, resolve_config
from nbdist.errors import ConfigError, PoolStartError, PoolStateError
from nbdist.history import History
from nbdist.launch import LOOPBACK, controller_address, engine_launcher_config
from nbdist.placement import place

if TYPE_CHECKING:
    from nbdist.runner import CellResult

# The hub announces an engine only after its heart has been seen beating, about two heartbeat
# periods after it registers: at ipyparallel's 3 s period that is 6 of a 6.6 s start. A 250 ms
# period brings a 2-engine start to ~1.6 s. The tolerance stays 15 s (60 misses), so a busy
# machine is not mistaken for dead engines; local engine deaths are seen from exit codes at once.
HEARTBEAT_ARGS = ["--HeartMonitor.period=250", "--HeartMonitor.max_heartmonitor_misses=60"]
EXIT_SETTLE_SECONDS = 2.0  # how long an engine the controller dropped may take to be seen exiting


@dataclass(frozen=True)
class EngineInfo:
    """One engine as the pool knows it."""

    rank: int
    engine_id: int
    host: str
    pid: int
    gpu: str | None
    device: str
    address: str = LOOPBACK
    """Where this engine's host is reached from the others (loopback on one machine)."""
    interface: str | None = None
    threads: int = 1


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
    lost: bool = False
    """Seen only as gone from the controller (an engine on another host, or its host, died)."""

    def describe(self) -> str:
        code = self.exit_code
        if self.lost:
            how = "stopped answering the controller (the engine or its host is gone)"
        elif code is None:
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
        preload: str | None = None,
        config: PoolConfig | None = None,
    ) -> None:
        self.config = config or resolve_config(n, gpus, start_timeout=start_timeout, grace=grace, preload=preload)
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
        cfg, plan = self.config, self.config.launch
        if not plan.owns_engines:
            return self._connect()
        launch = Config()
        launch.ControllerLauncher.controller_cmd = guard.command(os.getpid(), "ipyparallel.controller")
        self._controller_ip = controller_address(plan)
        cluster = ipp.Cluster(
            config=launch,
            n=cfg.n,
            cluster_id=f"nbdist-{uuid.uuid4().hex[:8]}",
            controller_ip=self._controller_ip,
            engine_timeout=int(cfg.start_timeout),
            delay=0.0,
            log_level=logging.ERROR,
            shutdown_atexit=False,  # stop() and the guards end every process; no second try at exit
            controller_args=HEARTBEAT_ARGS,
        )
        self._cluster = cluster
        try:
            cluster.start_controller_sync()
            _owner_only(cluster)
            if plan.remote:
                # Engines elsewhere cannot watch this process: they watch the controller instead.
                port = _registration_port(cluster)
                engine_cmd = guard.remote_command(plan.python or "python3", self._controller_ip, port,
                                                  "ipyparallel.engine")
            else:
                engine_cmd = guard.command(os.getpid(), "ipyparallel.engine", cfg.preload)
            cluster.engine_launcher_class = engine_launcher_config(
                plan, cluster.config, engine_cmd, f"/tmp/{cluster.cluster_id}"
            )
            if not plan.remote:
                # Local engines wait for the controller's connection file themselves, so they
                # start (and import) while the controller is still coming up.
                self._start_engine_processes()
            self._client = cluster.connect_client_sync()
            _owner_only(cluster)
            if plan.remote:
                self._start_engine_processes()
            self._adopt(self._wait_for_new_engines(set(), cfg.n, cfg.start_timeout))
        except BaseException as exc:
            self.stop()
            if isinstance(exc, Exception):
                if isinstance(exc, PoolStartError):
                    raise
                raise PoolStartError(f"the pool did not start: {exc}") from exc
            raise
        return self

    def _connect(self) -> Pool:
        """Join a cluster started elsewhere (`ipcluster start`, a job script): its engines are
        used, never stopped or restarted by this pool."""
        target = self.config.launch.connect
        assert target is not None
        try:
            if os.path.isfile(target):
                client = ipp.Client(target, timeout=self.config.start_timeout)
            else:
                client = ipp.Client(profile=target, timeout=self.config.start_timeout)
        except Exception as exc:
            raise PoolStartError(
                f"could not join the cluster {target!r}: {exc}. Give a running cluster's profile name or its "
                "ipcontroller-client.json file (from `ipcluster start` or `ipcontroller`)."
            ) from exc
        self._client = client
        self._cluster = _JoinedCluster()
        self._controller_ip = _client_controller_ip(client)
        try:
            ids = self._wait_for_new_engines(set(), max(self.config.n, 1), self.config.start_timeout)
            if self.config.n == 0:
                ids = sorted(client.ids)
            self._adopt(ids)
        except BaseException:
            self.stop()
            raise
        return self

    def _launch_engines(self, known: set[int]) -> None:
        """Start `n` engines and adopt them: wait for registration, pin GPUs, assign ranks."""
        self._start_engine_processes()
        self._adopt(self._wait_for_new_engines(known, self.config.n, self.config.start_timeout))

    def _start_engine_processes(self) -> None:
        cluster, cfg = self._cluster, self.config
        assert cluster is not None
        threads = str(cfg.threads_per_engine or 1)
        try:
            cluster.start_engines_sync(
                cfg.n, environment={name: threads for name in engine_side.THREAD_VARIABLES}
            )
        except Exception as exc:
            raise PoolStartError(_launch_failure(cfg, cluster, exc)) from exc

    def _adopt(self, new_ids: list[int]) -> None:
        """Ask each engine where it runs, give it a rank, GPU and threads, and pin them."""
        client, cfg = self._client, self.config
        assert client is not None
        client[new_ids].use_cloudpickle()
        asks = [client[eid].apply_async(engine_side.probe, self._controller_ip) for eid in new_ids]
        facts = [ar.get(timeout=cfg.start_timeout) for ar in asks]
        local = not cfg.launch.remote
        placements = place(
            facts,
            local_gpus=(cfg.gpus if cfg.uses_gpus else ()) if local else None,
            local_threads=cfg.threads_per_engine if local else None,
            use_gpus=cfg.use_gpus,
        )
        pins = [client[new_ids[p.index]].apply_async(engine_side.describe, p.gpu, p.threads, p.local_rank, p.slots)
                for p in placements]
        for ar in pins:
            ar.get(timeout=cfg.start_timeout)
        self._engines = tuple(
            EngineInfo(
                rank=p.rank,
                engine_id=new_ids[p.index],
                host=facts[p.index].host,
                pid=facts[p.index].pid,
                gpu=p.gpu,
                device=f"cuda:{p.gpu}" if p.gpu is not None else "cpu",
                address=facts[p.index].address,
                interface=facts[p.index].interface,
                threads=p.threads,
            )
            for p in placements
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
            ended = self._launcher_ended()
            if ended is not None:
                raise PoolStartError(
                    f"the engine launcher ended before {n - len(fresh)} of {n} engines registered. "
                    f"Its output ends with:\n{ended}"
                )
            if time.monotonic() > deadline:
                raise PoolStartError(
                    f"only {len(fresh)} of {n} engines registered within {timeout:.0f} s; "
                    "see the engine logs in the ipyparallel profile's log folder."
                )
            time.sleep(0.02)

    def _launcher_ended(self) -> str | None:
        """The tail of a launcher's output once it has stopped (mpiexec exits when an engine
        fails), so a broken start is reported at once, not after the whole start timeout."""
        cluster = self._cluster
        if cluster is None or isinstance(cluster, _JoinedCluster):
            return None
        for engine_set in list(cluster.engines.values()):
            if getattr(engine_set, "state", "") == "after" and not getattr(engine_set, "launchers", None):
                try:
                    output = str(engine_set.get_output() or "")
                except Exception:  # noqa: BLE001 - no output to show is no reason to hide the failure
                    output = ""
                return "\n".join(output.strip().splitlines()[-15:]) or "(no output)"
        return None

    def _find_processes(self) -> dict[int, psutil.Process]:
        """The launcher's process handles, by rank: they know the exit code once reaped."""
        assert self._cluster is not None
        by_pid: dict[int, psutil.Process] = {}
        if self.config.launch.remote:  # a PID on another host is not a process here
            return {}
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
        if isinstance(cluster, _JoinedCluster):
            return  # not ours to stop
        if cluster is not None:
            try:
                cluster.stop_cluster_sync()
            except Exception as exc:  # noqa: BLE001 - e.g. a launcher that never started; reap below
                self.log.warning("nbdist: stopping the cluster: %s", exc)
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
        if isinstance(cluster, _JoinedCluster):
            raise PoolStateError(
                "this pool joined a cluster it did not start (--connect), so it cannot give it fresh engines: "
                "restart that cluster's engines (e.g. `ipcluster stop` / `ipcluster start`), then reconnect."
            )
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
        """Engines that have ended, or that the controller no longer has, with how they ended.

        Both are asked. A local engine's exit status says how it ended. The controller's
        registry covers engines with no process here (other hosts), and engines whose death
        ipyparallel announced (its nanny reports one at once, failing the engine's tasks)
        before this process could see the exit."""
        client = self._client
        registered = set(client.ids) if client is not None else {e.engine_id for e in self._engines}
        ended = []
        for engine in self._engines:
            process = self._procs.get(engine.rank)
            code = _RUNNING if process is None else _exit_status(process)
            if code is _RUNNING and engine.engine_id in registered:
                continue
            if code is _RUNNING and process is not None:
                code = _await_exit(process, EXIT_SETTLE_SECONDS)  # unregistered: its status is on the way
            lost = code is _RUNNING
            exit_code = None if lost else cast("int | None", code)
            ended.append(EngineExit(engine.rank, engine.host, engine.pid, exit_code, lost=lost))
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
        # Each address is the engine's own on the route to the controller (loopback on one
        # machine), and each port is chosen free by the engine that will listen on it.
        engines = self._engines
        master = engines[0].address
        port = self._views[0].apply_sync(engine_side.free_port, master)
        peers: tuple[str, ...] = ()
        if spec.needs_peers:
            from nbdist.runner import gather_or_fail

            asks = [v.apply_async(engine_side.free_port, e.address) for v, e in zip(self._views, engines, strict=True)]
            hosts = [e.address for e in engines]
            if formation.strategy == "ps" and len(self._views) - 1 - formation.ps == 0:
                # No engine is left for a worker: the coordinator's engine hosts one (its own port).
                asks.append(self._views[0].apply_async(engine_side.free_port, master))
                hosts.append(master)
            ports = gather_or_fail(self, asks, what="choosing ports", timeout=self.config.start_timeout)
            peers = tuple(f"{h}:{p}" for h, p in zip(hosts, ports, strict=True))
        infos = [replace(i, peers=peers) for i in self.rank_infos(master_addr=master, master_port=port)]
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
                    threads=e.threads,
                    interface=e.interface,
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

    def summary(self) -> str:
        """One line for the user: how many engines, where, on which devices."""
        engines = self._engines
        gpus = [e.gpu for e in engines if e.gpu is not None]
        kind = f"GPUs {' | '.join(gpus)}" if gpus else "CPU"
        threads = sorted({e.threads for e in engines})
        where = ""
        hosts = list(dict.fromkeys(e.host for e in engines))
        if len(hosts) > 1:
            counts = ", ".join(f"{h}: {sum(e.host == h for e in engines)}" for h in hosts)
            where = f" on {len(hosts)} hosts ({counts})"
        return f"{len(engines)} engines ready{where} ({kind}, {'/'.join(map(str, threads))} threads each)."

    def __repr__(self) -> str:
        state = f"{len(self._engines)} engines, backend {self._backend}" if self.is_running else "stopped"
        return f"<nbdist.Pool {state}>"


_RUNNING = object()


class _JoinedCluster:
    """Stands for a cluster this pool joined but does not own (nothing to start or stop)."""

    engines: dict[str, Any] = {}
    controller = None
    cluster_id = "joined"


def _owner_only(cluster: ipp.Cluster) -> None:
    """Connection files hold the key that signs every message: readable by their owner only."""
    folder = os.path.join(cluster.profile_dir, "security")
    for name in os.listdir(folder):
        if cluster.cluster_id in name:
            os.chmod(os.path.join(folder, name), 0o600)


def _registration_port(cluster: ipp.Cluster) -> int:
    path = os.path.join(cluster.profile_dir, "security", f"ipcontroller-{cluster.cluster_id}-engine.json")
    deadline = time.monotonic() + 10
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.05)
    with open(path) as handle:
        return int(json.load(handle)["registration"])


def _client_controller_ip(client: ipp.Client) -> str:
    url = str(client._config.get("interface") or client._config.get("url") or "")
    host = url.split("://")[-1].rsplit(":", 1)[0]
    return host if host and host not in ("*", "0.0.0.0", "localhost") else LOOPBACK


def _launch_failure(cfg: PoolConfig, cluster: ipp.Cluster, exc: Exception) -> str:
    """Name the host that could not be reached (ipyparallel's error names only the command)."""
    plan = cfg.launch
    if plan.launcher == "ssh":
        # The SSH launcher registers each host's launcher ("host/i") just before starting it,
        # so the last one registered is the host that failed.
        keys = [key for eset in cluster.engines.values() for key in getattr(eset, "launchers", {})]
        failed = keys[-1].rsplit("/", 1)[0] if keys else plan.hosts[0].name
        detail = getattr(exc, "output", None) or getattr(exc, "stderr", None) or exc
        if isinstance(detail, bytes):
            detail = detail.decode(errors="replace")
        return (
            f"could not start engines on host {failed} over SSH: {str(detail).strip()[-500:]}. "
            f"Check that `ssh {failed}` works without a password prompt and that {plan.python or 'python3'} "
            "there has nbdist and ipyparallel installed (--python names it). Nothing was left running."
        )
    return f"the {plan.launcher} launcher could not start the engines: {exc}"


def _await_exit(process: psutil.Process, seconds: float) -> Any:
    """The exit status of a process expected to end within `seconds`, or _RUNNING."""
    deadline = time.monotonic() + seconds
    code = _exit_status(process)
    while code is _RUNNING and time.monotonic() < deadline:
        time.sleep(0.02)
        code = _exit_status(process)
    return code


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
