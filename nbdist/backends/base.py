"""The small interface every framework backend implements (runs on engines)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any


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
    """How the engines are joined: a strategy and its options (e.g. the number of parameter
    servers). Fixed for the engines' life; a different one needs fresh engines."""

    strategy: str
    ps: int = 0


class Backend(ABC):
    """A framework's part in a pool: form the group once, then give cells their names."""

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
