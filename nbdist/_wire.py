"""What crosses the wire between the notebook kernel and the engines, in one place.

Both sides import this module, so it imports neither a framework nor ipyparallel at load
time. What travels: small frozen descriptions (who a rank is, how the group is formed, what an
engine found on its host) and each rank's cell outcome. What never travels: a framework object
whose pickling runs a collective or needs a module only the engines import; such a last value
is sent as its rich display instead (`portable`).
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from typing import Any

LOOPBACK = "127.0.0.1"
METRICS_KEY_PREFIX = "nbdist:"
"""Each batch of reported metrics is published under its own numbered key: ipyparallel's
`publish_data` keeps only the latest value per key."""


@dataclass(frozen=True)
class RankInfo:
    """Who this engine is in the job; decided by the kernel, handed to the engine."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    node_rank: int
    master_addr: str
    master_port: int
    gpu: str | None
    threads: int
    peers: tuple[str, ...] = ()
    """`host:port` per rank, free on that rank's host: where frameworks that give every
    process its own server (TensorFlow's gRPC) listen. Empty where one rendezvous suffices."""
    interface: str | None = None
    """The network interface that reaches the other hosts (None on one machine), for
    libraries that would otherwise pick one from the host name (gloo, NCCL)."""
    store: str | None = None
    """On one machine, the file the ranks meet through (a private folder; nothing listens).
    None across hosts, where rank 0 listens on `master_addr:master_port`."""

    def torchrun_env(self) -> dict[str, str]:
        """The variables torchrun sets, so scripts written for torchrun run unchanged."""
        return {
            "RANK": str(self.rank),
            "LOCAL_RANK": str(self.local_rank),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_WORLD_SIZE": str(self.local_world_size),
            "GROUP_RANK": str(self.node_rank),
            "NODE_RANK": str(self.node_rank),
            "ROLE_RANK": str(self.rank),
            "ROLE_WORLD_SIZE": str(self.world_size),
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
            "TORCHELASTIC_RUN_ID": "nbdist",
            # Across hosts, the interface that reaches the others; gloo and NCCL would
            # otherwise resolve the host name, which may well be a loopback address.
            **({"GLOO_SOCKET_IFNAME": self.interface, "NCCL_SOCKET_IFNAME": self.interface}
               if self.interface else {}),
        }


@dataclass(frozen=True)
class Formation:
    """How the engines are joined: a backend, and for backends joined per strategy, the
    strategy and its options (e.g. the number of parameter servers). Fixed for the engines'
    life; a different one needs fresh engines."""

    backend: str
    strategy: str = ""
    options: tuple[tuple[str, int], ...] = ()

    def option(self, name: str, default: int = 0) -> int:
        return dict(self.options).get(name, default)

    def describe(self) -> str:
        return f"{self.backend} --strategy {self.strategy}" if self.strategy else self.backend


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
    names: dict[str, Any] | None = None
    """What changed in the namespace (names, types, attribute names) for Tab completion."""


@dataclass(frozen=True)
class RemoteValue:
    """A last-expression value that cannot leave the engine: shown by its rich display."""

    data: dict[str, Any]

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        return self.data

    def __repr__(self) -> str:
        return str(self.data.get("text/plain", "<value on engine>"))


@dataclass(frozen=True)
class CollectiveExport:
    """The answer "this value is sharded: ask every rank at once" to a one-rank export."""


@dataclass(frozen=True)
class Packed:
    """A value pickled on the engine, to be loaded in the kernel only where it can be.

    ipyparallel's client loads replies inside its message callback: a class the notebook cannot
    import (defined in a module only the engines have) raised there, the reply was dropped, and
    the cell or the pull waited forever. Bytes always arrive; `unpack` then says what is wrong."""

    data: bytes
    type_name: str
    text: str
    """The value's repr, shown when it cannot be loaded here."""

    @property
    def module(self) -> str:
        return self.type_name.rpartition(".")[0]


@dataclass(frozen=True)
class Unpicklable:
    """A value that cannot leave its engine at all (it does not pickle there)."""

    type_name: str
    text: str
    reason: str


def _type_name(value: Any) -> str:
    kind = type(value)
    return f"{kind.__module__}.{kind.__qualname__}"


def _short_repr(value: Any) -> str:
    import reprlib

    shorter = reprlib.Repr()
    shorter.maxstring = shorter.maxother = 2000
    try:
        return shorter.repr(value)
    except Exception as exc:  # noqa: BLE001 - a broken __repr__ must not lose the outcome
        return f"<{_type_name(value)} (repr failed: {exc})>"


def pack(value: Any) -> Packed | Unpicklable:
    """Pickle `value` on the engine (cloudpickle: classes defined in cells travel by value)."""
    import cloudpickle

    try:
        data = cloudpickle.dumps(value)
    except Exception as exc:  # noqa: BLE001 - e.g. a lock, a socket, a generator
        return Unpicklable(_type_name(value), _short_repr(value), f"{type(exc).__name__}: {exc}")
    return Packed(data, _type_name(value), _short_repr(value))


class CannotLoad(Exception):
    """A value from an engine that the kernel cannot load; the message names the fix."""


def unpack(packed: Any, what: str) -> Any:
    """The value in the kernel, or CannotLoad naming its type and what to do."""
    if isinstance(packed, Unpicklable):
        raise CannotLoad(f"{what} is a {packed.type_name}, which cannot leave its engine ({packed.reason}): "
                         f"pull a plain value computed from it instead. On the engine it is {packed.text}")
    if not isinstance(packed, Packed):
        return packed
    try:
        return pickle.loads(packed.data)
    except Exception as exc:  # noqa: BLE001 - any failure to load is the same problem for the user
        import importlib.util

        top = packed.module.split(".")[0]
        missing = top not in ("", "builtins") and importlib.util.find_spec(top) is None
        fix = (f"import {packed.module} in the notebook first (it must be importable here too), or pull a plain "
               "value (a number, list, array or tensor)") if missing else \
            "this type cannot be re-created outside its process: pull a plain value computed from it"
        raise CannotLoad(f"{what} is a {packed.type_name}, which the notebook cannot load "
                         f"({type(exc).__name__}: {exc}): {fix}. On the engine it is {packed.text}") from None


PLAIN_TYPES = (int, float, complex, bool, str, bytes, type(None))
PLAIN_ARRAYS = {"numpy.ndarray", "torch.Tensor", "torch.nn.parameter.Parameter", "pandas.DataFrame",
                "pandas.Series", "pandas.core.frame.DataFrame", "pandas.core.series.Series"}


def plain(value: Any, depth: int = 0) -> bool:
    """Whether pickling `value` can only copy data. Anything else may run code of its own when
    pickled: a Keras `History` reads a SyncOnRead variable, which starts a collective that only
    the rank showing the value joins, and the cell hangs."""
    if isinstance(value, PLAIN_TYPES):
        return True
    kind = type(value)
    if f"{kind.__module__}.{kind.__qualname__}" in PLAIN_ARRAYS or kind.__module__ == "numpy":
        return True
    if depth < 3 and isinstance(value, (list, tuple, set, frozenset)) and len(value) <= 10_000:
        return all(plain(v, depth + 1) for v in value)
    if depth < 3 and isinstance(value, dict) and len(value) <= 10_000:
        return all(plain(k, depth + 1) and plain(v, depth + 1) for k, v in value.items())
    return False


def portable(value: Any, shell: Any) -> tuple[Any, dict[str, Any] | None]:
    """A last value as it travels: plain data packed; anything else only as its display, built
    here on the engine, since pickling an arbitrary object may run a collective (see `plain`).
    The object itself stays on the engine, where `%nbdist pull` takes it on purpose."""
    if plain(value):
        packed = pack(value)
        if isinstance(packed, Packed):
            return packed, None
    data, _ = shell.display_formatter.format(value)
    return RemoteValue(data), data


def shown(value: Any, what: str) -> Any:
    """A last value in the kernel: itself, or its repr when the notebook cannot load it."""
    try:
        return unpack(value, what)
    except CannotLoad:
        assert isinstance(value, Packed)
        return RemoteValue({"text/plain": value.text})


def remote_traceback(exc: BaseException) -> str:
    """The text of an error that came back from an engine (ipyparallel's RemoteError renders
    the engine's traceback; anything else is shown as its type and message)."""
    render = getattr(exc, "render_traceback", None)
    if callable(render):
        return "\n".join(render())
    ename = getattr(exc, "ename", None) or type(exc).__name__
    return f"{ename}: {exc}"
