"""The engines of one pool as processes, over `ipyparallel.Cluster`.

This package is the only code that touches ipyparallel's processes and internals (launchers,
their process handles and state, the client's connection settings); everything above it
sees ranks, views, exits and a `recover()`.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any, cast

import ipyparallel as ipp
import psutil
from traitlets.config import Config

from nbdist._errors import PoolStartError, PoolStateError
from nbdist._interrupts import interrupt_flag
from nbdist._net import LOOPBACK
from nbdist._patience import patience, waited
from nbdist._say import say
from nbdist._wire import Formation
from nbdist.cluster import _guard as guard
from nbdist.cluster._adopt import EngineInfo, adopt
from nbdist.cluster._config import PoolConfig
from nbdist.cluster._exits import RUNNING, EngineExit, await_exit, exit_status
from nbdist.cluster._internals import (
    POOL_VARIABLE,
    client_controller_ip,
    end_engine_descendants,
    forget_unsubmitted,
    launch_failure,
    owner_only,
    reap_stragglers,
    registration_port,
)
from nbdist.cluster._jobs import JobWatch, missing_commands, unknown_partition
from nbdist.cluster._launch import SCHEDULERS, controller_address, engine_launcher_config, engine_python
from nbdist.cluster._streams import tap
from nbdist.engine._context import THREAD_VARIABLES
from nbdist.engine._stacks import STACK_SIGNAL

# The hub announces an engine only after its heart has been seen beating, about two heartbeat
# periods after it registers: at ipyparallel's 3 s period that is 6 of a 6.6 s start. A 250 ms
# period brings a 2-engine start to ~1.6 s. The tolerance stays 15 s (60 misses), so a busy
# machine is not mistaken for dead engines; local engine deaths are seen from exit codes at once.
HEARTBEAT_ARGS = ["--HeartMonitor.period=250", "--HeartMonitor.max_heartmonitor_misses=60"]
EXIT_SETTLE_SECONDS = 2.0  # how long an engine the controller dropped may take to be seen exiting

class EngineCluster:
    """Start, watch, replace and stop the engines of one pool; a running one is what a cell
    runner may ask for views, exits, `recover()` and `interrupt()`."""

    def __init__(self, config: PoolConfig) -> None:
        self.config = config
        self.controller_ip = LOOPBACK
        self.engines: tuple[EngineInfo, ...] = ()
        self.views: tuple[Any, ...] = ()
        self._cluster: ipp.Cluster | None = None
        self._client: ipp.Client | None = None
        self._procs: dict[int, psutil.Process] = {}
        self._joined = False
        self._deadline = time.monotonic()
        self._scratch: str | None = None
        self.formation: Formation | None = None
        """What the engines are joined for; None until the first cell, and again after recovery."""

    @property
    def grace(self) -> float:
        return self.config.grace

    @property
    def running(self) -> bool:
        return self._client is not None

    @property
    def cluster_id(self) -> str:
        return self._cluster.cluster_id if self._cluster is not None else "joined"

    @property
    def profile_dir(self) -> str:
        """The ipyparallel profile folder: connection files in `security/`, logs in `log/`."""
        if self._cluster is not None:
            return str(self._cluster.profile_dir)
        return str(getattr(self._client, "_config", {}).get("profile_dir", "") or "")

    @property
    def client(self) -> ipp.Client:
        assert self._client is not None
        return self._client

    # -- starting ----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the controller and engines, and wait until every engine has registered: all
        within `start_timeout` (stretched on a loaded machine), launching included."""
        cfg, plan = self.config, self.config.launch
        self._deadline = time.monotonic() + patience(cfg.start_timeout)
        if not plan.owns_engines:
            self._connect()
            return
        missing = missing_commands(plan.launcher)
        if missing:
            raise PoolStartError(f"--launcher {plan.launcher} needs {', '.join(missing)}, which this machine does not "
                                 "have on its PATH: run the notebook on the cluster's login node (or a node that can "
                                 "submit jobs), or choose another launcher.")
        unknown = unknown_partition(plan.launcher, plan.partition)
        if unknown:
            raise PoolStartError(unknown)
        launch = Config()
        launch.ControllerLauncher.controller_cmd = guard.command(os.getpid(), "ipyparallel.controller")
        self.controller_ip = controller_address(plan)
        cluster = ipp.Cluster(
            config=launch,
            n=cfg.n,
            cluster_id=f"nbdist-{uuid.uuid4().hex[:8]}",
            controller_ip=self.controller_ip,
            engine_timeout=int(cfg.start_timeout),
            delay=0.0,
            log_level=logging.ERROR,
            shutdown_atexit=False,  # stop() and the guards end every process; no second try at exit
            controller_args=HEARTBEAT_ARGS,
        )
        self._cluster = cluster
        try:
            cluster.start_controller_sync()
            owner_only(cluster)
            if plan.remote:
                # Engines elsewhere cannot watch this process: they watch the controller instead.
                port = registration_port(cluster)
                engine_cmd = guard.remote_command(engine_python(plan), self.controller_ip, port,
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
            tap(self._client)  # before any request, so no piece of output reaches the old handler
            owner_only(cluster)
            if plan.remote:
                self._start_engine_processes()
            self._adopt(self._wait_for_new_engines(set(), cfg.n))
        except BaseException as exc:
            self.stop()
            if isinstance(exc, Exception) and not isinstance(exc, PoolStartError):
                raise PoolStartError(f"the pool did not start: {exc}") from exc
            raise

    def _connect(self) -> None:
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
        self._client, self._joined = client, True
        tap(client)
        self.controller_ip = client_controller_ip(client)
        try:
            ids = self._wait_for_new_engines(set(), max(self.config.n, 1))
            self._adopt(sorted(client.ids) if self.config.n == 0 else ids)
        except BaseException:
            self.stop()
            raise

    def _start_engine_processes(self) -> None:
        cluster, cfg = self._cluster, self.config
        assert cluster is not None
        threads = str(cfg.threads_per_engine or 1)
        try:
            environment = {name: threads for name in THREAD_VARIABLES}
            environment[POOL_VARIABLE] = cluster.cluster_id  # inherited by whatever an engine starts
            cluster.start_engines_sync(cfg.n, environment=environment)
        except Exception as exc:
            raise PoolStartError(launch_failure(cfg, cluster, exc)) from exc

    def _adopt(self, new_ids: list[int]) -> None:
        self.engines = adopt(self.client, new_ids, self.config, self.controller_ip,
                             timeout=max(1.0, self._deadline - time.monotonic()))
        self.views = tuple(self.client[e.engine_id] for e in self.engines)
        self._procs = self._find_processes()
        self.formation = None

    def _wait_for_new_engines(self, known: set[int], n: int) -> list[int]:
        began = time.monotonic()
        launcher = self.config.launch.launcher
        job = JobWatch(launcher) if launcher in SCHEDULERS and self._cluster is not None else None
        while True:
            fresh = sorted(set(self.client.ids) - known)
            if len(fresh) >= n:
                return fresh[:n]
            ended = self._launcher_ended()
            if ended is not None:
                raise PoolStartError(
                    f"the engine launcher ended before {n - len(fresh)} of {n} engines registered. "
                    f"Its output ends with:\n{ended}"
                )
            if job is not None and self._cluster is not None:
                for engine_set in list(self._cluster.engines.values()):
                    gone = job.ended(engine_set)
                    if gone is not None:
                        engine_set.job_id = ""  # nothing left to cancel (see forget_unsubmitted)
                        raise PoolStartError(f"the {launcher} job for the engines ended before {n - len(fresh)} of "
                                             f"{n} engines registered: {gone}")
            if time.monotonic() > self._deadline:
                asked = self.config.start_timeout
                state = (f" The scheduler says {job.last.describe()}; the job was cancelled."
                         if job is not None and job.last is not None else "")
                raise PoolStartError(
                    f"only {len(fresh)} of {n} engines registered with the controller within "
                    f"{waited(asked, time.monotonic() - began)} (a longer --timeout helps on a busy machine).{state} "
                    f"What the engines printed is in {self.logs()}"
                )
            time.sleep(0.02)

    def logs(self) -> str:
        """Where the engines' output goes: each launcher's log file here, or the profile's log
        folder (on the remote hosts for engines started there)."""
        files: list[str] = []
        if self._cluster is not None:
            for engine_set in list(self._cluster.engines.values()):
                launchers = list(getattr(engine_set, "launchers", {}).values()) or [engine_set]
                files += [str(f) for launcher in launchers if (f := getattr(launcher, "output_file", ""))]
        folder = os.path.join(self.profile_dir, "log") if self.profile_dir else "the profile's log folder"
        return ", ".join(files) if files else folder

    def _launcher_ended(self) -> str | None:
        """The tail of a launcher's output once it has stopped (mpiexec exits when an engine
        fails), so a broken start is reported at once, not after the whole start timeout."""
        if self._cluster is None:
            return None
        for engine_set in list(self._cluster.engines.values()):
            if getattr(engine_set, "state", "") == "after" and not getattr(engine_set, "launchers", None):
                try:
                    output = str(engine_set.get_output() or "")
                except Exception:  # noqa: BLE001 - no output to show is no reason to hide the failure
                    output = ""
                return "\n".join(output.strip().splitlines()[-15:]) or "(no output)"
        return None

    def _find_processes(self) -> dict[int, psutil.Process]:
        """The launcher's process handles, by rank: they know the exit code once reaped."""
        if self._cluster is None or self.config.launch.remote:  # a PID elsewhere is not a process here
            return {}
        by_pid: dict[int, psutil.Process] = {}
        for engine_set in self._cluster.engines.values():
            for launcher in getattr(engine_set, "launchers", {}).values():
                process = getattr(launcher, "process", None)
                if isinstance(process, psutil.Process):
                    by_pid[process.pid] = process
        return {e.rank: by_pid[e.pid] for e in self.engines if e.pid in by_pid}

    # -- replacing and stopping --------------------------------------------------------------

    def recover(self) -> float:
        """Kill every engine, start new ones and adopt them. Returns the seconds it took.

        It ends either with fresh engines or with the pool plainly stopped (an interrupt or a
        failure half-way would leave dead engines behind a pool that looks alive)."""
        started = time.monotonic()
        try:
            with interrupt_flag() as interrupted:
                self._replace_engines()
            if interrupted.is_set():  # raised inside ipyparallel's event loop, and lost there
                raise KeyboardInterrupt
        except BaseException as exc:
            self.stop()
            how = "was interrupted" if isinstance(exc, KeyboardInterrupt) else f"failed ({exc})"
            raise PoolStateError(f"starting fresh engines {how}: the pool is now stopped, with no engine or controller "
                                 "left running. Start it again with `%nbdist start` (or Pool.start()).") from None
        return time.monotonic() - started

    def _replace_engines(self) -> None:
        if self._joined:
            raise PoolStateError(
                "this pool joined a cluster it did not start (--connect), so it cannot give it fresh engines: "
                "restart that cluster's engines (e.g. `ipcluster stop` / `ipcluster start`), then reconnect."
            )
        cluster = self._cluster
        assert cluster is not None
        known = set(self.client.ids) | {e.engine_id for e in self.engines}
        for process in self._procs.values():
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        cluster.stop_engines_sync()
        end_engine_descendants(cluster.cluster_id)
        self._deadline = time.monotonic() + patience(self.config.start_timeout)
        self._start_engine_processes()
        self._adopt(self._wait_for_new_engines(known, self.config.n))

    def stop(self) -> None:
        """Stop every engine and the controller (not those of a joined cluster); safe twice."""
        cluster, client = self._cluster, self._client
        self._cluster, self._client = None, None
        self.engines, self.views, self._procs, self.formation = (), (), {}, None
        if client is not None:
            client.close()
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None
        if cluster is not None:
            forget_unsubmitted(cluster)
            try:
                cluster.stop_cluster_sync()
            except Exception as exc:  # noqa: BLE001 - e.g. a launcher that never started; reap below
                say(f"stopping the cluster: {exc}", unasked=True)
            finally:
                reap_stragglers(cluster)
                end_engine_descendants(cluster.cluster_id)

    # -- watching ------------------------------------------------------------------------------

    def exits(self) -> list[EngineExit]:
        """Engines that have ended, or that the controller no longer has, with how they ended.

        Both are asked. A local engine's exit status says how it ended. The controller's
        registry covers engines with no process here (other hosts), and engines whose death
        ipyparallel announced (its nanny reports one at once, failing the engine's tasks)
        before this process could see the exit."""
        client = self._client
        registered = set(client.ids) if client is not None else {e.engine_id for e in self.engines}
        ended = []
        for engine in self.engines:
            process = self._procs.get(engine.rank)
            code = RUNNING if process is None else exit_status(process)
            if code is RUNNING and engine.engine_id in registered:
                continue
            if code is RUNNING and process is not None:
                code = await_exit(process, EXIT_SETTLE_SECONDS)  # unregistered: its status is on the way
            lost = code is RUNNING
            exit_code = None if lost else cast("int | None", code)
            ended.append(EngineExit(engine.rank, engine.host, engine.pid, exit_code, lost=lost))
        return ended

    def busy(self, ranks: Sequence[int]) -> dict[int, bool]:
        """Whether each of `ranks` (alive ones) has a task queued or running."""
        ids = {self.engines[r].engine_id: r for r in ranks if self.engines[r].engine_id in self.client.ids}
        queue = self.client.queue_status(targets=list(ids)) if ids else {}
        return {rank: bool(queue.get(eid, {}).get("tasks", 0)) if isinstance(queue, dict) else False
                for eid, rank in ids.items()}

    def interrupt(self, ranks: Sequence[int]) -> None:
        """SIGINT to the engines of `ranks`; one that cannot be signalled is freed by recovery."""
        self._signal(ranks, signal.SIGINT)

    def scratch_file(self, kind: str) -> str:
        """A path no one has used, in a folder of this cluster's that only its owner can read;
        the folder goes when the cluster stops."""
        if self._scratch is None:
            self._scratch = tempfile.mkdtemp(prefix=f"{self.cluster_id}-")
        return os.path.join(self._scratch, f"{kind}-{uuid.uuid4().hex[:12]}")

    def dump_stacks(self, ranks: Sequence[int]) -> None:
        """Signal these ranks' engines to dump their stacks (one that cannot: "stack not read")."""
        self._signal(ranks, STACK_SIGNAL)

    def _signal(self, ranks: Sequence[int], signum: int) -> None:
        """Directly where the engine is our process (local engines have no nanny), through the
        engine's nanny elsewhere; either works while the engine is blocked."""
        for rank in ranks:
            process = self._procs.get(rank)
            try:
                if process is not None:
                    process.send_signal(signum)
                else:
                    self.client.send_signal(signum, targets=[self.engines[rank].engine_id], block=False)
            except Exception:  # noqa: BLE001, S110 - see the callers
                pass

    def push(self, namespace: Mapping[str, Any]) -> None:
        self.client[[e.engine_id for e in self.engines]].push(dict(namespace), block=True)

    def joined(self, formation: Formation, devices: Sequence[str]) -> None:
        """Record that every engine joined `formation`, and each rank's device as it says."""
        self.engines = tuple(replace(e, device=str(d)) for e, d in zip(self.engines, devices, strict=False))
        self.formation = formation

