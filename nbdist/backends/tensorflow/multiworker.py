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
    threads = "all"
    """Each worker on its own cores, TensorFlow's and gRPC's threads included, with as many
    inter-op threads as it has cores: on 2 cores, 2 workers with every thread free and 2
    inter-op threads each ran 0.7-0.9x two plain TF_CONFIG processes; placed so, 1.1-1.3x
    (`benchmarks/tf_parity.py`)."""

    def configure(self, tf: Any, info: RankInfo) -> None:
        tf.config.threading.set_inter_op_parallelism_threads(info.threads)

    def roles(self, info: RankInfo, options: Mapping[str, int]) -> Roles | None:
        return {"worker": list(info.peers[:info.world_size])}, "worker", info.rank

    def form(self, tf: Any, info: RankInfo, options: Mapping[str, int],
             servers: list[Any]) -> tuple[Any, dict[str, Any]]:
        communication = tf.distribute.experimental.CommunicationOptions(
            implementation=tf.distribute.experimental.CommunicationImplementation.RING
        )
        return tf.distribute.MultiWorkerMirroredStrategy(communication_options=communication), {}
