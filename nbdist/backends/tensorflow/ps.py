"""`--strategy ps [--ps N]`: ParameterServerStrategy with a coordinator, workers and N servers."""

from __future__ import annotations

import socket
import time
from collections.abc import Mapping
from typing import Any

from nbdist._errors import ConfigError
from nbdist._wire import RankInfo
from nbdist.backends.tensorflow._strategy import Roles, TFStrategy


class ParameterServer(TFStrategy):
    """Asynchronous training: variables live on the parameter servers, workers pull them,
    compute a step and push updates, each at its own pace; rank 0 is the chief, the
    coordinator that runs the cell and schedules steps on the workers.

    Ranks: 0 is the chief, the last `ps` are parameter servers, those between are workers.
    With no rank left for a worker, the chief's engine hosts one on an extra port."""

    name = "ps"
    options = ("ps",)

    def check(self, world_size: int, options: Mapping[str, int]) -> None:
        ps = options.get("ps", 1)
        if not 1 <= ps <= world_size - 1:
            raise ConfigError(
                f"--ps {ps} does not fit {world_size} engines: one engine is the coordinator, so choose 1 to "
                f"{world_size - 1} parameter servers (and start more engines for dedicated workers)."
            )

    def extra_servers(self, world_size: int, options: Mapping[str, int]) -> int:
        return 1 if world_size - 1 - options.get("ps", 1) == 0 else 0

    def runs_cell(self, rank: int, world_size: int, options: Mapping[str, int]) -> bool:
        return rank == 0  # the coordinator; workers and servers serve over gRPC

    def roles(self, info: RankInfo, options: Mapping[str, int]) -> Roles | None:
        peers, n = list(info.peers), info.world_size
        first_ps = n - options.get("ps", 1)
        workers = peers[1:first_ps] or peers[n:n + 1]
        cluster = {"chief": peers[:1], "worker": workers, "ps": peers[first_ps:n]}
        if info.rank == 0:
            return cluster, "chief", 0
        if info.rank >= first_ps:
            return cluster, "ps", info.rank - first_ps
        return cluster, "worker", info.rank - 1

    def form(self, tf: Any, info: RankInfo, options: Mapping[str, int],
             servers: list[Any]) -> tuple[Any, dict[str, Any]]:
        resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
        spec = resolver.cluster_spec()
        config = tf.compat.v1.ConfigProto(intra_op_parallelism_threads=info.threads,
                                          inter_op_parallelism_threads=max(2, info.threads))
        task_type, index = resolver.task_type, resolver.task_id
        if task_type in ("worker", "ps"):
            servers.append(_server(tf, spec, task_type, index, config))
            return None, {}
        if info.peers[info.world_size:]:  # no worker engine: this (the chief's) engine hosts it
            servers.append(_server(tf, spec, "worker", 0, config))
        cluster = spec.as_dict()
        _wait_for(list(cluster["worker"]) + list(cluster["ps"]))
        strategy = tf.distribute.ParameterServerStrategy(resolver)
        # The property reads the resolver from `extended`, where this strategy never puts it
        # (it keeps it on itself): tutorial code reading `strategy.cluster_resolver` got None.
        strategy.extended._cluster_resolver = resolver
        return strategy, {"coordinator": tf.distribute.coordinator.ClusterCoordinator(strategy)}

    def describe(self, device: str, task: tuple[str, int], info: RankInfo) -> str:
        role = f"{task[0]} {task[1]}"
        if role == "chief 0" and info.peers[info.world_size:]:
            role += " + worker 0"
        return f"{role}, {device}"


def _server(tf: Any, spec: Any, job: str, index: int, config: Any) -> Any:
    return tf.distribute.Server(spec, job_name=job, task_index=index, protocol="grpc", config=config, start=True)


def _wait_for(addresses: list[str], timeout: float = 60.0) -> None:
    """Wait until every server accepts connections: the coordinator must not connect first."""
    deadline = time.monotonic() + timeout
    for address in addresses:
        host, port = address.rsplit(":", 1)
        while True:
            try:
                socket.create_connection((host, int(port)), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"TensorFlow server {address} did not come up in {timeout:g} s") from None
                time.sleep(0.05)
