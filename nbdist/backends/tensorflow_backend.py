"""TensorFlow backend: a `TF_CONFIG` cluster formed once per engine life, for one strategy.

TensorFlow reads `TF_CONFIG` and its logging variables when it is imported and starts a gRPC
server per process that cannot be torn down, so everything here happens before the first
import, and a pool joined for one strategy needs fresh engines for another. Keras is the
legacy `tf-keras` (`TF_USE_LEGACY_KERAS=1`): Keras 3's `fit` fails under
MultiWorkerMirroredStrategy (keras#20585), while tf-keras's works.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from nbdist.backends.base import Backend, Formation, RankInfo

ENVIRONMENT = {
    "TF_USE_LEGACY_KERAS": "1",
    "TF_CPP_MIN_LOG_LEVEL": "2",  # INFO and WARNING from C++ (oneDNN notices, cuInit on CPU machines)
    "GRPC_VERBOSITY": "ERROR",
    "GRPC_FAIL_FAST": "use_caller",  # ParameterServerStrategy's advice: fail RPCs fast, let it retry
}


@contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Send file descriptor 2 to /dev/null: TensorFlow's C++ start-up lines are written there
    before its log level applies, and an engine forwards that descriptor to the cell."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def cluster_roles(info: RankInfo, formation: Formation) -> tuple[dict[str, list[str]], str, int]:
    """The cluster spec and this rank's (task type, index).

    multiworker: every rank is a worker. ps: rank 0 is the chief (the coordinator that runs the
    cell), the last `ps` ranks are parameter servers, ranks between are workers; with no rank
    left for a worker, the chief's engine hosts one on the extra peer address."""
    peers = list(info.peers)
    n = info.world_size
    if formation.strategy == "multiworker":
        return {"worker": peers[:n]}, "worker", info.rank
    first_ps = n - formation.ps
    workers = peers[1:first_ps] or peers[n:n + 1]
    cluster = {"chief": peers[:1], "worker": workers, "ps": peers[first_ps:n]}
    if info.rank == 0:
        return cluster, "chief", 0
    if info.rank >= first_ps:
        return cluster, "ps", info.rank - first_ps
    return cluster, "worker", info.rank - 1


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


class TensorFlowBackend(Backend):
    name = "tensorflow"

    def __init__(self) -> None:
        self.formation = Formation("multiworker")
        self.task: tuple[str, int] = ("worker", 0)
        self.strategy: Any = None
        self.coordinator: Any = None
        self._servers: list[Any] = []  # kept alive: a tf.distribute.Server stops when collected

    def setup(self, info: RankInfo, formation: Formation) -> None:
        self.formation = formation
        os.environ.update(ENVIRONMENT)
        if formation.strategy == "mirrored":
            os.environ.pop("TF_CONFIG", None)
            if info.rank != 0:
                return  # one process, its own devices: the other engines stay idle
            self.task = ("local", 0)
        else:
            cluster, task_type, index = cluster_roles(info, formation)
            self.task = (task_type, index)
            os.environ["TF_CONFIG"] = json.dumps({"cluster": cluster, "task": {"type": task_type, "index": index}})
        with _quiet_stderr():
            import tensorflow as tf

            self._configure(tf, info)
            self._form(tf, info)
        _attach_reporter_to_fit(tf)

    def _configure(self, tf: Any, info: RankInfo) -> None:
        import logging

        tf.get_logger().setLevel(logging.ERROR)
        tf.config.threading.set_intra_op_parallelism_threads(info.threads)
        tf.config.threading.set_inter_op_parallelism_threads(max(2, info.threads))
        if self.formation.strategy == "mirrored" and not tf.config.list_physical_devices("GPU"):
            # A CPU engine mirrors over two logical CPUs, so the replicas (and their
            # all-reduce) are real even without GPUs.
            cpu = tf.config.list_physical_devices("CPU")[0]
            tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

    def _form(self, tf: Any, info: RankInfo) -> None:
        strategy = self.formation.strategy
        if strategy == "multiworker":
            options = tf.distribute.experimental.CommunicationOptions(
                implementation=tf.distribute.experimental.CommunicationImplementation.RING
            )
            self.strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
        elif strategy == "mirrored":
            gpus = tf.config.list_logical_devices("GPU")
            devices = [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]
            self.strategy = tf.distribute.MirroredStrategy(devices)
        else:
            self._form_ps(tf, info)

    def _form_ps(self, tf: Any, info: RankInfo) -> None:
        resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
        spec = resolver.cluster_spec()
        config = tf.compat.v1.ConfigProto(intra_op_parallelism_threads=info.threads,
                                          inter_op_parallelism_threads=max(2, info.threads))
        task_type, index = self.task
        if task_type in ("worker", "ps"):
            self._servers.append(tf.distribute.Server(spec, job_name=task_type, task_index=index,
                                                      protocol="grpc", config=config, start=True))
            return
        cluster = spec.as_dict()
        if info.peers[info.world_size:]:  # no worker engine: this (the chief's) engine hosts it
            self._servers.append(tf.distribute.Server(spec, job_name="worker", task_index=0,
                                                      protocol="grpc", config=config, start=True))
        _wait_for(list(cluster["worker"]) + list(cluster["ps"]))
        self.strategy = tf.distribute.ParameterServerStrategy(resolver)
        self.coordinator = tf.distribute.coordinator.ClusterCoordinator(self.strategy)

    def runs_cell(self, info: RankInfo) -> bool:
        if self.formation.strategy == "multiworker":
            return True
        return info.rank == 0  # the coordinator (ps) or the one mirrored process

    def namespace(self, info: RankInfo) -> dict[str, Any]:
        names: dict[str, Any] = {"strategy": self.strategy, "task_type": self.task[0], "task_index": self.task[1]}
        if self.coordinator is not None:
            names["coordinator"] = self.coordinator
        return names

    def export(self, value: Any) -> Any:
        numpy = getattr(value, "numpy", None)  # tensors and variables leave as NumPy arrays
        return numpy() if callable(numpy) else value

    def describe_device(self, info: RankInfo) -> str:
        role = f"{self.task[0]} {self.task[1]}" if self.formation.strategy == "ps" else ""
        if role == "chief 0" and info.peers[info.world_size:]:
            role += " + worker 0"
        device = f"gpu:{info.gpu}" if info.gpu is not None else f"cpu ({info.threads} threads)"
        if self.formation.strategy == "mirrored":
            return f"{device}, mirrored" if info.rank == 0 else "idle (mirrored runs on rank 0)"
        return f"{role}, {device}" if role else device


def _attach_reporter_to_fit(tf: Any) -> None:
    """Make `model.fit` inside a `%%distributed` cell feed the dashboard without being asked:
    a `nbdist.keras.Reporter` is added unless the call already has one."""
    model_class = tf.keras.Model
    if getattr(model_class.fit, "_nbdist", False):
        return
    original = model_class.fit

    def fit(self: Any, *args: Any, callbacks: Any = None, **kwargs: Any) -> Any:
        from nbdist import metrics
        from nbdist.keras import Reporter

        callbacks = list(callbacks or [])
        if metrics.active() is not None and not any(isinstance(c, Reporter) for c in callbacks):
            data = args[0] if args else kwargs.get("x")
            callbacks.append(Reporter(samples_per_step=_batch_size(data, kwargs.get("batch_size"))))
        return original(self, *args, callbacks=callbacks, **kwargs)

    fit._nbdist = True  # type: ignore[attr-defined]
    fit.__doc__ = original.__doc__
    model_class.fit = fit


def _batch_size(data: Any, batch_size: Any) -> int | None:
    """Samples this process trains per step, where that can be told from fit's arguments."""
    if isinstance(batch_size, int):
        return batch_size
    size, dataset = None, data
    for _ in range(16):  # a batched tf.data.Dataset, maybe behind options/prefetch/map stages
        size = getattr(dataset, "_batch_size", None)
        dataset = getattr(dataset, "_input_dataset", None)
        if size is not None or dataset is None:
            break
    try:
        return int(size) if size is not None else 32 if hasattr(data, "shape") else None
    except (TypeError, ValueError):
        return None
