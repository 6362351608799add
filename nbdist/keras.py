"""Keras (tf-keras) helpers for `%%distributed --backend tensorflow` cells. Imports TensorFlow:
use it on engines (where the TensorFlow backend has set Keras up), not in the notebook kernel.

`model.fit` in a cell gets a `Reporter` on its own; pass one yourself to choose its settings.
"""

from __future__ import annotations

import math
from typing import Any

import tensorflow as tf

from nbdist import engine as metrics


class Reporter(tf.keras.callbacks.Callback):
    """Sends each training batch's loss and metrics to the nbdist dashboard.

    `samples_per_step` is the global batch (what the dataset is batched with); the reporter
    turns it into this process's share, so the dashboard's global throughput adds up.
    Outside a cell (no dashboard) it does nothing, like `nbdist.report`.

    Under ParameterServerStrategy a batch's logs are remote values that would make the
    coordinator wait for each step; there the reporter counts steps and samples per batch and
    reports the loss at each epoch's end (Keras allows batch hooks only for such callbacks)."""

    def __init__(self, samples_per_step: int | None = None) -> None:
        super().__init__()
        self._supports_tf_logs = True  # logs come as tensors / RemoteValues, converted here when cheap
        self.samples_per_step = samples_per_step
        self._step = 0
        self._share = 1.0
        self._total: int | None = None
        self._remote = False
        self._means: dict[str, float] = {}
        self._scale = 1.0

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self._step = 0
        steps, epochs = self.params.get("steps"), self.params.get("epochs")
        self._total = int(steps * epochs) if steps and epochs else None
        strategy = getattr(self.model, "distribute_strategy", None)
        self._share = _process_share(strategy)
        # Keras sums a batch's per-replica results ("auto" reduction), so a batch log of N
        # replicas reads N times the value; its epoch logs come from the metrics and do not.
        reduction = getattr(self.model, "distribute_reduction_method", "auto")
        replicas = getattr(strategy, "num_replicas_in_sync", 1) or 1
        self._scale = 1.0 / replicas if reduction in ("auto", "sum") else 1.0

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        if metrics.active() is None:
            return
        values: dict[str, Any] = {"step": self._step, "total": self._total}
        if _is_remote(logs):  # parameter-server training: do not wait for the step to run
            self._remote = True
        else:
            for name, value in (logs or {}).items():
                number = None if _is_remote(value) else _number(value)
                if number is not None:
                    values[name] = self._this_batch(name, number * self._scale, batch)
        if self.samples_per_step:
            values["samples"] = self.samples_per_step * self._share
        metrics.report(**values)
        self._step += 1

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self._means = {}

    def _this_batch(self, name: str, mean: float, batch: int) -> float:
        """Keras logs the running mean over the epoch so far; the dashboard wants this batch's
        value, which follows from two consecutive means (exact for equal-sized batches)."""
        previous = self._means.get(name)
        self._means[name] = mean
        if batch == 0 or previous is None:
            return mean
        return (batch + 1) * mean - batch * previous

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        if metrics.active() is None or not self._remote or logs is None:
            return
        if _is_remote(logs):
            logs = logs.fetch()
        values = {name: _number(v.fetch() if _is_remote(v) else v) for name, v in dict(logs).items()}
        metrics.report(step=self._step - 1, epoch=epoch, **{k: v for k, v in values.items() if v is not None})


def _is_remote(value: Any) -> bool:
    return hasattr(value, "fetch")


def _process_share(strategy: Any) -> float:
    """This process's part of a global batch: 1/2 for each of two MultiWorkerMirrored workers,
    1 for a MirroredStrategy or a parameter-server coordinator (one process reports)."""
    try:
        local = len(strategy.extended.worker_devices)
        return float(local) / float(strategy.num_replicas_in_sync)
    except Exception:  # noqa: BLE001 - strategies without per-process devices report it all
        return 1.0


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None
