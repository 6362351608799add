"""`--strategy mirrored`: MirroredStrategy over the devices of one engine (rank 0)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nbdist._wire import RankInfo
from nbdist.backends.tensorflow._strategy import TFStrategy


class Mirrored(TFStrategy):
    """One process, several devices: replicas on each device of rank 0's engine, their
    gradients all-reduced inside the process. The other engines stay idle."""

    name = "mirrored"

    def joins(self, info: RankInfo) -> bool:
        return info.rank == 0

    def runs_cell(self, rank: int, world_size: int, options: Mapping[str, int]) -> bool:
        return rank == 0

    def configure(self, tf: Any, info: RankInfo) -> None:
        if not tf.config.list_physical_devices("GPU"):
            # A CPU engine mirrors over two logical CPUs, so the replicas (and their
            # all-reduce) are real even without GPUs.
            cpu = tf.config.list_physical_devices("CPU")[0]
            tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

    def describe(self, device: str, task: tuple[str, int], info: RankInfo) -> str:
        return f"{device}, mirrored"

    def form(self, tf: Any, info: RankInfo, options: Mapping[str, int],
             servers: list[Any]) -> tuple[Any, dict[str, Any]]:
        gpus = tf.config.list_logical_devices("GPU")
        devices = [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]
        return tf.distribute.MirroredStrategy(devices), {}
