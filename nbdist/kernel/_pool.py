"""`Pool`: a persistent set of engines that form one distributed job.

This is the product; `%nbdist`, `%%distributed` and the widgets are thin views on it. The
engines' processes are the cluster's (`EngineCluster`); the pool adds the process group,
running cells, moving values, and the run history.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from nbdist._errors import ConfigError, DistributedCellError, PoolStateError, PoolValueError
from nbdist._say import say
from nbdist._wire import CannotLoad, CollectiveExport, Formation, unpack
from nbdist.backends import backend_spec
from nbdist.cluster import EngineCluster, EngineExit, EngineInfo, PoolConfig, resolve_options
from nbdist.engine import _calls as engine_calls
from nbdist.engine import _debug as engine_debug
from nbdist.kernel._completion import EngineNames
from nbdist.kernel._contain import gather_or_fail
from nbdist.kernel._debugger import DebugRelay
from nbdist.kernel._group import form_group, refuse_switch
from nbdist.kernel._history import History
from nbdist.kernel._runner import CellObserver, CellResult, CellRunner, heal


@dataclass(frozen=True)
class EngineStatus:
    rank: int
    engine_id: int
    host: str
    pid: int
    device: str
    state: str
    """`idle`, `busy` or `dead (...)`."""


class Pool:
    """A pool of engines that keeps its processes, and their process group, between cells.

    Every option of `%nbdist start` is a keyword here (`hosts="h1:2,h2:2"`, `launcher="slurm"`,
    `gpus_per_engine=2`, ...), resolved once into `config`.

    >>> with Pool(n=2) as pool:
    ...     pool.run("import torch.distributed as dist; dist.get_world_size()").value
    2
    """

    def __init__(self, n: int | None = None, *, config: PoolConfig | None = None, **options: Any) -> None:
        self.config = config or resolve_options(n, **options)
        self.history = History()
        self.names = EngineNames()
        self.last_failed_ranks: list[int] = []
        """The ranks that raised in the last failed cell (where `%nbdist debug` looks first)."""
        """The engines' variables as Tab completion knows them (names, types, attributes)."""
        self._cluster: EngineCluster | None = None
        self._cells = 0

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def is_running(self) -> bool:
        return self._cluster is not None and self._cluster.running

    def start(self) -> Pool:
        """Start the controller and engines, and wait until every engine has registered."""
        if self.is_running:
            raise PoolStateError("the pool is already running: use restart() or stop() first.")
        cluster = EngineCluster(self.config)
        cluster.start()
        self._cluster = cluster
        return self

    def stop(self) -> None:
        """Stop every engine and the controller; safe to call twice."""
        cluster, self._cluster = self._cluster, None
        if cluster is not None:
            cluster.stop()

    def restart(self) -> None:
        """Fresh engines (all engine state is lost); the process group is re-formed on next use."""
        self.recover()

    def recover(self) -> float:
        """Kill every engine, start new ones and adopt them. Returns the seconds it took."""
        return self._running().recover()

    def __enter__(self) -> Pool:
        if not self.is_running:
            self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- inspection ------------------------------------------------------------------------

    def _running(self) -> EngineCluster:
        if self._cluster is None or not self._cluster.running:
            raise PoolStateError("no pool is running: start one with `%nbdist start` or Pool.start().")
        return self._cluster

    @property
    def engines(self) -> tuple[EngineInfo, ...]:
        return self._cluster.engines if self._cluster is not None else ()

    @property
    def views(self) -> tuple[Any, ...]:
        """One ipyparallel DirectView per rank, in rank order."""
        return self._running().views

    @property
    def backend(self) -> str | None:
        formation = self._cluster.formation if self._cluster is not None else None
        return formation.backend if formation is not None else None

    def exits(self) -> list[EngineExit]:
        """Engines that have ended, or that the controller no longer has, with how they ended."""
        return self._running().exits()

    def status(self) -> list[EngineStatus]:
        cluster = self._running()
        dead = {x.rank: x for x in cluster.exits()}
        busy = cluster.busy([e.rank for e in cluster.engines if e.rank not in dead])
        rows = []
        for e in cluster.engines:
            if e.rank in dead:
                state = f"dead (exit {dead[e.rank].exit_code})"
            else:
                state = "busy" if busy.get(e.rank) else "idle"
            rows.append(EngineStatus(e.rank, e.engine_id, e.host, e.pid, e.device, state))
        return rows

    # -- data in and out -------------------------------------------------------------------

    def push(self, namespace: Mapping[str, Any]) -> None:
        """Copy notebook values to every engine."""
        self._running().push(namespace)

    def pull(self, name: str, rank: int = 0) -> Any:
        """A value from one rank (parallel wrappers removed, tensors on the CPU)."""
        cluster = self._running()
        views = cluster.views
        if not isinstance(rank, int) or not 0 <= rank < len(views):
            raise ConfigError(f"--rank {rank!r} is out of range: ranks are 0..{len(views) - 1}.")
        # Not apply_sync: it turns an interrupt into a pending result, which the caller would keep.
        value = views[rank].apply_async(engine_calls.export, name).get()
        if isinstance(value, CollectiveExport):  # sharded: every rank gathers it together
            pending = [view.apply_async(engine_calls.export, name, True, r == rank) for r, view in enumerate(views)]
            value = gather_or_fail(cluster, pending, what=f"gathering {name}",
                                   timeout=self.config.start_timeout)[rank]
        try:
            return unpack(value, f"{name} (rank {rank})")
        except CannotLoad as exc:
            raise PoolValueError(str(exc)) from None

    def pull_all(self, name: str) -> list[Any]:
        """Every rank's value of `name`, in rank order."""
        return [self.pull(name, rank=rank) for rank in range(len(self._running().views))]

    def debug(self, rank: int | None = None) -> None:
        """pdb on the traceback of the last failed cell, on `rank` (default: the first rank that
        raised), driven from here: commands are read with `input()` and run on the engine."""
        cluster = self._running()
        if rank is None:
            rank = self.last_failed_ranks[0] if self.last_failed_ranks else 0
        if not 0 <= rank < len(cluster.views):
            raise ConfigError(f"--rank {rank} is out of range: ranks are 0..{len(cluster.views) - 1}.")
        ar = cluster.views[rank].apply_async(engine_debug.post_mortem)
        relay = DebugRelay()
        while not ar.done():
            relay.serve(rank, ar)
            ar.wait(0.05)
        relay.serve(rank, ar)
        try:
            last = ar.get()
        except Exception as exc:  # a RemoteError: nothing failed on that rank
            raise PoolStateError(f"%nbdist debug: {getattr(exc, 'evalue', exc)}") from None
        if last.strip():
            print(last.rstrip(), flush=True)

    def memory(self, timeout: float = 5.0) -> list[dict[str, float]]:
        """Per rank: parameter, gradient and optimizer-state MB held (what sharding divides);
        empty for a rank that is dead or does not answer within `timeout`."""
        cluster = self._running()
        dead = {x.rank for x in cluster.exits()}
        pending = {r: v.apply_async(engine_calls.memory) for r, v in enumerate(cluster.views) if r not in dead}
        rows: list[dict[str, float]] = []
        for rank in range(len(cluster.views)):
            try:
                rows.append(pending[rank].get(timeout=timeout) if rank in pending else {})
            except Exception:  # noqa: BLE001 - a busy or failing engine: no figure rather than a hang
                rows.append({})
        return rows

    # -- running code ----------------------------------------------------------------------

    def ensure_backend(self, backend: str, formation: Formation | None = None) -> None:
        """Form the backend's process group on first use; it then lives as long as the engines."""
        cluster = self._running()
        spec = backend_spec(backend)
        formation = formation or spec.formation(spec.default)
        if cluster.formation == formation:
            return
        if cluster.formation is not None:
            raise refuse_switch(cluster.formation, formation)
        form_group(cluster, formation)

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
        observers: Iterable[CellObserver] = (),
        line_offset: int = 0,
        ranks: str | Sequence[int] | None = None,
        tensorboard: str | None = None,
        retries: int = 0,
        retries_on: str = "engine",
    ) -> CellResult:
        """Run `source` on every rank and return rank 0's last-expression value and outputs.

        `ps` is the number of parameter servers for TensorFlow's `ps` strategy. `restart`
        gives the pool fresh engines first when they are joined for another backend or
        strategy (engine state is lost, so it is never done without being asked). `ranks`
        (`"0"`, `"0,2"`, `"1-3"`, `"all"` or a list) runs the cell on those ranks only; the
        first of them gives the value. `tensorboard` (a folder) also writes the cell's metrics
        there as TensorBoard scalars when it ends.

        `retries` runs the cell again, up to that many times, after an engine dies (the pool
        recovered first, so the cell starts on fresh engines: a cell that restores its last
        checkpoint resumes there), as torchrun's `--max-restarts` does; with `retries_on="error"`
        also after a rank raised. An interrupt, a timeout or a stopped pool is never retried."""
        if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
            raise ConfigError(f"retries must be a whole number of 0 or more (got {retries!r}).")
        if retries_on not in ("engine", "error"):
            raise ConfigError(f"retries_on must be 'engine' (an engine died) or 'error' (also a raising rank), "
                              f"not {retries_on!r}.")
        cluster = self._running()
        only = parse_ranks(ranks, len(cluster.engines))
        spec = backend_spec(backend)
        chosen = spec.strategy(strategy)
        formation = spec.formation(chosen, {"ps": ps})
        was = cluster.formation
        if restart and was is not None and was != formation:
            self.restart()
            say(f"engines restarted to switch from {was.describe()} to {backend} --strategy {chosen.name} "
                "(engine state was cleared).", unasked=True)
        heal(cluster)
        if cluster.formation is None:  # fresh engines: nothing of the old ones' names is left
            self.names.clear()
        self.ensure_backend(backend, formation)
        watchers = list(observers)
        if tensorboard is not None:
            from nbdist.kernel._tbwriter import TensorBoardObserver

            watchers.append(TensorBoardObserver(tensorboard))
        runner = CellRunner(cluster, output=output, observers=watchers, history=self.history)
        cell_id, tries, lost = self.next_cell_id(), 0, []
        while True:
            runner.retrying = tries < retries
            try:
                result = runner.run(source, cell_id=cell_id, backend=backend, strategy=chosen.name,
                                    timeout=timeout, line_offset=line_offset, only=only, again=tries > 0)
                break
            except DistributedCellError as exc:
                failed = time.monotonic()
                again = runner.retrying and not exc.stopped and cluster.running and (
                    exc.lost_state or retries_on == "error")
                if not again:
                    if runner.retrying:
                        runner.finish(False)
                    self.last_failed_ranks = [] if exc.lost_state else exc.failed_ranks
                    raise
                tries += 1
                heal(cluster)
                self.ensure_backend(backend, formation)
                lost.append(exc.recovery_seconds + time.monotonic() - failed)
                say(f"retry {tries} of {retries}: {exc.summary.strip().splitlines()[0]} Running the cell again "
                    f"({'fresh engines, ' if exc.lost_state else ''}ready again in {lost[-1]:.1f} s).", unasked=True)
        if tries:
            say(f"the cell finished after {tries} retr{'y' if tries == 1 else 'ies'} of {retries}.", unasked=True)
        result.retries, result.retry_seconds = tries, lost
        self.names.update(result.outcomes[0].names)
        return result

    def run_script(self, path: str, args: Sequence[str] = (), **options: Any) -> CellResult:
        """Run a script file on every rank as torchrun does: as `__main__`, with `sys.argv` set
        to `[path, *args]` and torchrun's variables in the environment. `options` are `run`'s.
        The path is read as the notebook sees it; every engine's host must have the file there."""
        full = os.path.abspath(os.path.expanduser(path))
        if not os.path.isfile(full):
            raise ConfigError(f"no script {path!r} (looked for {full}): give the path of a Python file, relative to "
                              f"the notebook's folder {os.getcwd()} or absolute.")
        source = (f"__import__('nbdist.engine._script', fromlist=['run_script']).run_script({full!r}, "
                  f"{list(args)!r})")
        return self.run(source, **options)

    def summary(self) -> str:
        """One line for the user: how many engines, where, on which devices."""
        engines = self.engines
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
        state = f"{len(self.engines)} engines, backend {self.backend}" if self.is_running else "stopped"
        return f"<nbdist.Pool {state}>"


def parse_ranks(spec: str | Sequence[int] | None, world: int) -> list[int] | None:
    """`0`, `0,2`, `1-3` or `all` (None: every rank) as a sorted list of ranks."""
    if spec is None or spec == "all":
        return None
    chosen: set[int] = set()
    if isinstance(spec, str):
        for part in (p.strip() for p in spec.split(",")):
            low, dash, high = part.partition("-")
            if not (low.isdigit() and (not dash or high.isdigit())):
                raise ConfigError(f"--ranks {spec!r} is not valid: use e.g. 0, 0,2, 1-3 or all.")
            chosen.update(range(int(low), int(high if dash else low) + 1))
    else:
        chosen.update(int(r) for r in spec)
    outside = sorted(r for r in chosen if not 0 <= r < world)
    if outside or not chosen:
        raise ConfigError(f"--ranks {spec!r}: this pool's ranks are 0..{world - 1}.")
    return sorted(chosen)
