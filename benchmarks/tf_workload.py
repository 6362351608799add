"""One MultiWorkerMirroredStrategy Keras workload, run unchanged by two plain processes with a
hand-written TF_CONFIG (the TensorFlow tutorial's way) and by a `%%distributed` cell."""

from __future__ import annotations

import time
from typing import Any


def train(strategy: Any, steps: int = 300, warmup: int = 30, width: int = 256, global_batch: int = 64) -> float:
    """Return steps per second of this worker over `steps` timed steps of `model.fit`.

    The clock stops at the end of the last step, not when `fit` returns. After the last step
    `fit` deletes its distributed dataset iterator, and that destructor waits for the input
    pipeline's background thread: 0 s in some runs, 3-14 s in others, in either worker, with
    or without nbdist (a native stack of the wait is in the README). Timed to `fit`'s return,
    those tails made both sides look "bimodal" (near 41 or near 80 steps/s for 400 steps)
    while every step took the same ~13 ms."""
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(0)
    x = rng.normal(size=(global_batch * 16, 128)).astype("float32")
    y = rng.integers(0, 10, size=(global_batch * 16,))
    data = tf.data.Dataset.from_tensor_slices((x, y)).repeat().batch(global_batch)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    data = data.with_options(options)
    with strategy.scope():
        model = tf.keras.Sequential([
            tf.keras.layers.Dense(width, activation="relu", input_shape=(128,)),
            tf.keras.layers.Dense(width, activation="relu"),
            tf.keras.layers.Dense(10),
        ])
        model.compile(optimizer=tf.keras.optimizers.SGD(0.01),
                      loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))

    class Clock(tf.keras.callbacks.Callback):  # type: ignore[misc]
        started = ended = 0.0

        def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
            if batch == warmup:
                Clock.started = time.perf_counter()

        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            Clock.ended = time.perf_counter()

    model.fit(data, epochs=1, steps_per_epoch=warmup + steps, verbose=0, callbacks=[Clock()])
    return steps / (Clock.ended - Clock.started)


if __name__ == "__main__":
    import argparse
    import json
    import os

    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    import tensorflow as tf

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    rate = train(strategy, steps=args.steps)
    if json.loads(os.environ["TF_CONFIG"])["task"]["index"] == 0:
        print(f"STEPS_PER_S {rate:.3f}", flush=True)
