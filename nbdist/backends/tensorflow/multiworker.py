"""`--strategy multiworker` (the default): MultiWorkerMirroredStrategy, every rank a worker."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nbdist._wire import RankInfo
from nbdist.backends.tensorflow._strategy import Roles, TFStrategy


class MultiWorker(TFStrategy):
    """Synchronous data parallelism: each worker holds the variables; gradients are
    all-reduced (ring) across workers at every step."""

    name = "multiworker"

    def roles(self, info: RankInfo, options: Mapping[str, int]) -> Roles | None:
        return {"worker": list(info.peers[:info.world_size])}, "worker", info.rank

    def form(self, tf: Any, info: RankInfo, options: Mapping[str, int],
             servers: list[Any]) -> tuple[Any, dict[str, Any]]:
        communication = tf.distribute.experimental.CommunicationOptions(
            implementation=tf.distribute.experimental.CommunicationImplementation.RING
        )
        return tf.distribute.MultiWorkerMirroredStrategy(communication_options=communication), {}
