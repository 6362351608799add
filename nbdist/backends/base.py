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
        }


class Backend(ABC):
    """A framework's part in a pool: form the group once, then give cells their names."""

    name: str

    @abstractmethod
    def setup(self, info: RankInfo) -> None:
        """Form the process group. Called once per engine life: groups are never re-formed."""

    @abstractmethod
    def namespace(self, info: RankInfo) -> dict[str, Any]:
        """Names a cell sees beside `rank`, `local_rank`, `world_size` (e.g. `device`)."""

    def export(self, value: Any) -> Any:
        """Make a value fit to leave the engine (unwrap parallel wrappers, move to CPU)."""
        return value

    def describe_device(self, info: RankInfo) -> str:
        return f"cuda:{info.gpu}" if info.gpu is not None else "cpu"
