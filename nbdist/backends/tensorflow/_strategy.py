"""What every TensorFlow strategy adds to `Strategy`: its cluster roles and how it is formed.

TensorFlow reads `TF_CONFIG` when it is imported and starts a gRPC server per process that
cannot be torn down, so the engines are joined for one strategy for their whole life."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nbdist._wire import RankInfo
from nbdist.backends._base import Strategy

Roles = tuple[dict[str, list[str]], str, int]
"""The cluster spec and this rank's task type and index, as `TF_CONFIG` carries them."""


class TFStrategy(Strategy):
    def roles(self, info: RankInfo, options: Mapping[str, int]) -> Roles | None:
        """This rank's place in the cluster, or None for a strategy that needs no cluster."""
        return None

    def joins(self, info: RankInfo) -> bool:
        """Whether this rank imports TensorFlow and takes part at all."""
        return True

    def configure(self, tf: Any, info: RankInfo) -> None:
        """Settings that must precede any TensorFlow op (logical devices)."""

    def form(self, tf: Any, info: RankInfo, options: Mapping[str, int],
             servers: list[Any]) -> tuple[Any, dict[str, Any]]:
        """Build the `tf.distribute` strategy; returns it and the extra names cells get. Servers
        started here go into `servers`, which the backend keeps (one stops when collected)."""
        raise NotImplementedError

    def describe(self, device: str, task: tuple[str, int], info: RankInfo) -> str:
        """The rank's device and role as `%nbdist status` shows them."""
        return device
