"""The two small interfaces a framework plugs in through: `Backend` and `Strategy`.

A `Strategy` is declared once and read on both sides. The kernel uses its name, its options,
its checks against the pool's size and the extra servers it needs; the engine uses how it
places threads and the framework work it does (`prepare` for PyTorch, forming a
`tf.distribute` strategy for TensorFlow). Strategy modules therefore import their framework
inside methods only: the kernel imports them, and must never import torch or TensorFlow.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from nbdist._errors import ConfigError
from nbdist._wire import Formation, RankInfo

ThreadPlacement = Literal["all", "compute", "free"]
"""Where a rank's threads run when it has its own block of cores: `all` of them on the block
(latency-bound strategies), only the `compute` thread (overlapped communication needs another
core), or left `free` to the OS."""


class Strategy:
    """One way of splitting training across the ranks, owned by its backend."""

    name: ClassVar[str]
    threads: ClassVar[ThreadPlacement] = "free"
    options: ClassVar[tuple[str, ...]] = ()
    """Option names this strategy takes from the cell (e.g. `ps`); fixed with the formation."""

    def check(self, world_size: int, options: Mapping[str, int]) -> None:
        """Raise ConfigError when the options cannot work with `world_size` engines."""

    def extra_servers(self, world_size: int, options: Mapping[str, int]) -> int:
        """Servers beyond one per rank that rank 0's engine hosts (each needs a port)."""
        return 0

    def runs_cell(self, rank: int, world_size: int, options: Mapping[str, int]) -> bool:
        """Whether this rank executes cells (a parameter server only serves variables)."""
        return True

    def pick(self, given: Mapping[str, int]) -> tuple[tuple[str, int], ...]:
        return tuple((name, given[name]) for name in self.options if name in given)

    def __repr__(self) -> str:
        return f"<strategy {self.name}>"


class Backend(ABC):
    """A framework's part in a pool, on an engine: form the group once, then give cells their names."""

    name: str

    @abstractmethod
    def setup(self, info: RankInfo, formation: Formation) -> None:
        """Form the process group. Called once per engine life: groups are never re-formed."""

    def runs_cell(self, info: RankInfo) -> bool:
        """Whether this rank executes cells (a parameter server only serves variables)."""
        return True

    @abstractmethod
    def namespace(self, info: RankInfo) -> dict[str, Any]:
        """Names a cell sees beside `rank`, `local_rank`, `world_size` (e.g. `device`)."""

    def export(self, value: Any) -> Any:
        """Make a value fit to leave the engine (unwrap parallel wrappers, move to CPU)."""
        return value

    def export_is_collective(self, value: Any) -> bool:
        """Whether exporting `value` needs every rank (gathering a sharded model)."""
        return False

    def memory(self, namespace: dict[str, Any]) -> dict[str, float]:
        """Model-state memory this rank holds (e.g. parameter / gradient / optimizer MB)."""
        return {}

    def describe_device(self, info: RankInfo) -> str:
        return f"cuda:{info.gpu}" if info.gpu is not None else "cpu"

    def only_ranks(self, ranks: tuple[int, ...]) -> AbstractContextManager[None]:
        """While a cell runs on `ranks` only: refuse collectives over ranks that do not run it
        (they would wait forever). The kernel also watches the stacks of such a cell."""
        return nullcontext()


@dataclass(frozen=True)
class BackendSpec:
    name: str
    target: str
    """`module:Class`, imported on engines only."""
    strategies: tuple[Strategy, ...]
    formed_per_strategy: bool = False
    """True where the engines are joined differently for each strategy (TensorFlow's cluster
    roles); PyTorch's one process group serves every strategy."""
    needs_peers: bool = False
    """Every rank listens on a port of its own (TensorFlow's gRPC servers)."""

    @property
    def default(self) -> Strategy:
        return self.strategies[0]

    def strategy(self, name: str | None) -> Strategy:
        """The named strategy (the default for None), or a ConfigError naming the choices."""
        if name is None:
            return self.default
        for strategy in self.strategies:
            if strategy.name == name:
                return strategy
        choices = ", ".join(s.name for s in self.strategies)
        raise ConfigError(f"--strategy {name!r} is not available for {self.name}: choose one of {choices}.")

    def formation(self, strategy: Strategy, options: Mapping[str, int] | None = None) -> Formation:
        if not self.formed_per_strategy:
            return Formation(self.name)
        return Formation(self.name, strategy.name, strategy.pick(options or {}))
