"""What runs inside an engine process: identity, process-group joining, cell execution.

The kernel calls these functions through ipyparallel. An engine is a process owned by
one pool, so its context (which rank it is, which backend it joined) is kept for the
process's life in `_CONTEXT`; nothing in the notebook kernel reads it.
"""

from __future__ import annotations

import ast
import linecache
import os
import pickle
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

from nbdist import metrics
from nbdist.backends import Backend, Formation, RankInfo, load_backend
from nbdist.devices import scheduler_local_rank, visible_gpus
from nbdist.launch import LOOPBACK, route_address
from nbdist.load import LoadSampler

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
LATENCY_BOUND = frozenset({"pipeline", "tensor"})  # strategies whose messages sit on every step's path
COMPUTE_BOUND = frozenset({"ddp", "fsdp"})  # strategies whose gloo work overlaps compute


@dataclass(frozen=True)
class EngineFacts:
    """What an engine reports about its machine before it is given a rank."""

    host: str
    pid: int
    address: str = LOOPBACK
    """This engine's address on the route to the controller: one the other hosts can reach."""
    interface: str | None = None
    cores: int = 1
    gpus: tuple[str, ...] = ()
    scheduler_local_rank: int | None = None


@dataclass
class EngineContext:
    info: RankInfo | None = None
    backend: Backend | None = None
    strategy: str = ""
    extras: dict[str, Any] = field(default_factory=dict)
    cores: frozenset[int] | None = None
    """The rank's own block of cores, where it has one."""
    allowed: frozenset[int] | None = field(
        default_factory=lambda: frozenset(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None)
    """The cores the engine was started with."""
    placed: str = "free"


_CONTEXT = EngineContext()


def current() -> EngineContext:
    """This engine's context; helpers read the strategy from it."""
    return _CONTEXT


@dataclass
class CellOutcome:
    """One rank's result of a cell. Failures are returned, not raised, so the kernel can
    tell a rank that raised from a rank that is still blocked."""

    rank: int
    ok: bool
    value: Any = None
    display: dict[str, Any] | None = None
    ename: str = ""
    evalue: str = ""
    traceback: str = ""
    interrupted: bool = False
    seconds: float = 0.0


@dataclass(frozen=True)
class RemoteValue:
    """A last-expression value that cannot leave the engine: shown by its rich display."""

    data: dict[str, Any]

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        return self.data

    def __repr__(self) -> str:
        return str(self.data.get("text/plain", "<value on engine>"))


def probe(controller: str) -> EngineFacts:
    """Report this engine's host, reachable address, cores and GPUs (nothing is changed)."""
    address = LOOPBACK if controller == LOOPBACK else route_address(controller)
    interface = None
    if address != LOOPBACK:
        import psutil

        interface = next((name for name, addrs in psutil.net_if_addrs().items()
                          if any(a.address == address for a in addrs)), None)
    return EngineFacts(
        host=socket.gethostname(),
        pid=os.getpid(),
        address=address,
        interface=interface,
        cores=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1,
        gpus=visible_gpus(os.environ),
        scheduler_local_rank=scheduler_local_rank(os.environ),
    )


def describe(gpu: str | None, threads: int, slot: int | None = None, slots: int = 1) -> None:
    """Pin the engine to its GPU and thread share. Must run before any framework import.

    `slot` of `slots` (the engine's place among those on its host) also gives the engine its
    own block of `threads` cores, where the blocks do not overlap; cells whose strategy is
    latency-bound run on it (see `_place_threads`)."""
    if slot is not None:
        _CONTEXT.cores = _core_block(threads, slot, slots)
    if gpu is not None:
        # Importing torch (preloaded while the engine starts) leaves CUDA untouched; only a
        # CUDA context made before this point would ignore CUDA_VISIBLE_DEVICES.
        torch = sys.modules.get("torch")
        if "tensorflow" in sys.modules or torch is not None and torch.cuda.is_initialized():
            raise RuntimeError("a framework was imported on this engine before its GPU was assigned")
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    else:
        # A CPU engine on a machine with GPUs (`--gpus none`): hide them, so that the cell's
        # `device`, `nbdist.torch.device()` and the process group all agree on the CPU.
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    for name in THREAD_VARIABLES:
        os.environ[name] = str(threads)


def _core_block(threads: int, slot: int, slots: int) -> frozenset[int] | None:
    if not hasattr(os, "sched_getaffinity"):
        return None  # not Linux: the OS places threads
    allowed = sorted(os.sched_getaffinity(0))
    if threads * slots > len(allowed):
        return None  # more engines than cores: any pinning would stack ranks on one core
    return frozenset(allowed[slot * threads:(slot + 1) * threads])


def _place_threads(strategy: str) -> None:
    """Keep a cell's compute on the rank's own cores; let gloo's threads float where they overlap.

    Every strategy of the torch backend runs its compute thread (the engine's main thread) on
    the rank's block: it no longer migrates, or waits for a core that another rank's thread
    took (DDP ran 7 %, FSDP 3-12 % faster here). Pipeline stages and tensor-parallel layers
    wait on small messages at every step, so there every thread of the rank, gloo's too, stays
    on the block, and a woken rank finds its core free (8-17 % faster). DDP and FSDP overlap
    gloo's work with compute instead and need another core for it: all pinned, FSDP ran 14 %
    slower. TensorFlow's thread pools are left to the OS."""
    block, allowed = _CONTEXT.cores, _CONTEXT.allowed
    if block is None or allowed is None:
        return
    mode = "all" if strategy in LATENCY_BOUND else "compute" if strategy in COMPUTE_BOUND else "free"
    if mode == _CONTEXT.placed:
        return
    main = threading.get_native_id()  # cells run on the engine's main thread
    for tid in os.listdir("/proc/self/task"):  # the affinity call takes one thread at a time
        try:
            os.sched_setaffinity(int(tid), block if mode == "all" or mode == "compute" and int(tid) == main
                                 else allowed)
        except OSError:
            pass  # a thread that has ended since the listing
    _CONTEXT.placed = mode


def free_port(bind_addr: str) -> int:
    """A port that is free on this engine's host, where the rendezvous will listen."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((bind_addr, 0))
        port: int = sock.getsockname()[1]
        return port


def join(info: RankInfo, backend_name: str, formation: Formation) -> str:
    """Form the backend's process group (once) and publish the rank's names to cells."""
    backend = load_backend(backend_name)
    backend.setup(info, formation)
    _CONTEXT.info = info
    _CONTEXT.backend = backend
    ns = _user_namespace()
    import nbdist

    ns.update(
        nbdist=nbdist,
        rank=info.rank,
        local_rank=info.local_rank,
        world_size=info.world_size,
        **backend.namespace(info),
    )
    return backend.describe_device(info)


def _user_namespace() -> dict[str, Any]:
    from IPython import get_ipython

    shell = get_ipython()
    if shell is None:  # pragma: no cover - engines always have a shell
        raise RuntimeError("nbdist.engine functions must run inside an ipyparallel engine")
    ns: dict[str, Any] = shell.user_ns
    return ns


def _split_last_expression(tree: ast.Module) -> tuple[ast.Module, ast.Expression | None]:
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        last = tree.body.pop()
        assert isinstance(last, ast.Expr)
        return tree, ast.Expression(last.value)
    return tree, None


def _format_failure(exc: BaseException, filename: str) -> str:
    """The traceback from the cell's own frames on, without nbdist's frames above them."""
    te = traceback.TracebackException.from_exception(exc)
    frames = list(te.stack)
    for i, frame in enumerate(frames):
        if frame.filename == filename:
            te.stack = traceback.StackSummary.from_list(frames[i:])
            break
    return "".join(te.format())


def _portable(value: Any, shell: Any) -> tuple[Any, dict[str, Any] | None]:
    """Return the value itself when it can travel, otherwise its rich display."""
    from ipyparallel import serialize

    try:
        # Loaded back here too: some values pickle but fail to load (sys.flags, say), and a
        # reply the kernel cannot load is dropped by ipyparallel's client: the cell would hang.
        serialize.deserialize_object(serialize.serialize_object(value))
        pickle.dumps(type(value))
    except Exception:
        data, _ = shell.display_formatter.format(value)
        return RemoteValue(data), data
    return value, None


def run_cell(
    source: str, cell_id: str, strategy: str, want_value: bool, line_offset: int = 0
) -> CellOutcome:
    """Execute a cell's source in the engine's user namespace.

    `line_offset` blank lines are put first so traceback line numbers match the lines the
    user sees in the notebook cell (whose first line is `%%distributed`)."""
    from IPython import get_ipython

    started = time.perf_counter()
    info = _CONTEXT.info
    rank = info.rank if info is not None else -1
    _CONTEXT.strategy = strategy
    _place_threads(strategy)
    if info is not None and _CONTEXT.backend is not None and not _CONTEXT.backend.runs_cell(info):
        return CellOutcome(rank=rank, ok=True)  # e.g. a parameter server: its gRPC server does the work
    shell = get_ipython()
    ns = _user_namespace()
    filename = f"<distributed cell {cell_id}>"
    code = "\n" * line_offset + shell.transform_cell(source)
    linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
    from ipyparallel.datapub import publish_data

    reporter = metrics.Reporter(publish_data)
    backend = _CONTEXT.backend
    extra = (lambda: backend.memory(ns)) if backend is not None else None
    sampler = LoadSampler(reporter.report, info.gpu if info is not None else None, extra=extra)
    metrics.activate(reporter, between_steps=sampler.between_steps)
    sampler.start()
    try:
        body, last = _split_last_expression(ast.parse(code, filename))
        exec(compile(body, filename, "exec"), ns)
        value = eval(compile(last, filename, "eval"), ns) if last is not None else None
    except BaseException as exc:  # noqa: BLE001 - every failure is reported, KeyboardInterrupt too
        _end_metrics(sampler, reporter)
        _flush_streams()
        return CellOutcome(
            rank=rank,
            ok=False,
            ename=type(exc).__name__,
            evalue=str(exc),
            traceback=_format_failure(exc, filename),
            interrupted=isinstance(exc, KeyboardInterrupt),
            seconds=time.perf_counter() - started,
        )
    _end_metrics(sampler, reporter)
    _flush_streams()
    display = None
    if want_value and value is not None:
        value, display = _portable(value, shell)
    else:
        value = None
    return CellOutcome(rank=rank, ok=True, value=value, display=display,
                       seconds=time.perf_counter() - started)


def _end_metrics(sampler: LoadSampler, reporter: metrics.Reporter) -> None:
    sampler.stop()
    metrics.activate(None)
    reporter.flush()


def _flush_streams() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a closed stream must not hide the cell's result
            pass


@dataclass(frozen=True)
class CollectiveExport:
    """The answer "this value is sharded: ask every rank at once" to a one-rank export."""


def export(name: str, collective: bool = False, wanted: bool = True) -> Any:
    """A user variable made fit for the notebook (e.g. a DDP model unwrapped, on CPU).

    A sharded model must be gathered by every rank together; asked alone (`collective`
    False) this rank says so instead of blocking, and the kernel asks all ranks."""
    ns = _user_namespace()
    if name not in ns:
        raise NameError(f"name {name!r} is not defined on this engine")
    value = ns[name]
    backend = _CONTEXT.backend
    if backend is None:
        return value
    if not collective and backend.export_is_collective(value):
        return CollectiveExport()
    exported = backend.export(value)
    return exported if wanted else None


def memory() -> dict[str, float]:
    """Model-state memory on this rank, for `%nbdist status` and the dashboard."""
    backend = _CONTEXT.backend
    return backend.memory(_user_namespace()) if backend is not None else {}
