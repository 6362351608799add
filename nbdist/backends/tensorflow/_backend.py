"""The TensorFlow backend on an engine: `TF_CONFIG` set, TensorFlow imported quietly, the
cell's `tf.distribute` strategy formed once. Keras is the legacy `tf-keras`
(`TF_USE_LEGACY_KERAS=1`): Keras 3's `fit` fails under MultiWorkerMirroredStrategy
(keras#20585), while tf-keras's works.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from nbdist._wire import Formation, RankInfo
from nbdist.backends._base import Backend
from nbdist.backends.tensorflow import SPEC
from nbdist.backends.tensorflow._fit import attach_reporter_to_fit
from nbdist.backends.tensorflow._strategy import TFStrategy

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


class TensorFlowBackend(Backend):
    name = "tensorflow"

    def __init__(self) -> None:
        self.chosen: TFStrategy = SPEC.default  # type: ignore[assignment]
        self.options: dict[str, int] = {}
        self.task: tuple[str, int] = ("worker", 0)
        self.strategy: Any = None
        self.names: dict[str, Any] = {}
        self._servers: list[Any] = []  # kept alive: a tf.distribute.Server stops when collected

    def setup(self, info: RankInfo, formation: Formation) -> None:
        chosen = SPEC.strategy(formation.strategy)
        assert isinstance(chosen, TFStrategy)
        self.chosen, self.options = chosen, dict(formation.options)
        os.environ.update(ENVIRONMENT)
        roles = chosen.roles(info, self.options)
        if roles is None:
            os.environ.pop("TF_CONFIG", None)
            self.task = ("local", 0)
        else:
            cluster, task_type, index = roles
            self.task = (task_type, index)
            os.environ["TF_CONFIG"] = json.dumps({"cluster": cluster, "task": {"type": task_type, "index": index}})
        if not chosen.joins(info):
            return
        with _quiet_stderr():
            import tensorflow as tf

            self._configure(tf, info)
            self.strategy, self.names = chosen.form(tf, info, self.options, self._servers)
        attach_reporter_to_fit(tf)

    def _configure(self, tf: Any, info: RankInfo) -> None:
        import logging

        tf.get_logger().setLevel(logging.ERROR)
        tf.config.threading.set_intra_op_parallelism_threads(info.threads)
        tf.config.threading.set_inter_op_parallelism_threads(max(2, info.threads))
        self.chosen.configure(tf, info)

    def runs_cell(self, info: RankInfo) -> bool:
        return self.chosen.runs_cell(info.rank, info.world_size, self.options)

    def namespace(self, info: RankInfo) -> dict[str, Any]:
        return {"strategy": self.strategy, "task_type": self.task[0], "task_index": self.task[1], **self.names}

    def export(self, value: Any) -> Any:
        numpy = getattr(value, "numpy", None)  # tensors and variables leave as NumPy arrays
        return numpy() if callable(numpy) else value

    def describe_device(self, info: RankInfo) -> str:
        if not self.chosen.joins(info):
            return f"idle ({self.chosen.name} runs on rank 0)"
        device = f"gpu:{info.gpu}" if info.gpu is not None else f"cpu ({info.threads} threads)"
        return self.chosen.describe(device, self.task, info)
