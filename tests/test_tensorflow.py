"""The TensorFlow backend on a real 2-engine pool: real gRPC servers and collectives.

Distributed results are compared with the same training run as one plain process (a
subprocess: the test process, like the notebook kernel, never imports TensorFlow)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
from _procs import listeners, not_loopback, pool_processes

import nbdist

pytestmark = pytest.mark.integration

# Data and model shared by the distributed cells and the single-process reference.
COMMON = """
import numpy as np, tensorflow as tf
rng = np.random.default_rng(0)
x = rng.normal(size=(256, 8)).astype("float32")
y = (x @ np.linspace(-1, 1, 8).astype("float32"))[:, None] + 0.1
GLOBAL_BATCH = 32
def build():
    init = tf.keras.initializers
    return tf.keras.Sequential([
        tf.keras.layers.Dense(16, activation="tanh", input_shape=(8,), kernel_initializer=init.GlorotUniform(seed=1)),
        tf.keras.layers.Dense(1, kernel_initializer=init.GlorotUniform(seed=2)),
    ])
def dataset():
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return ds.with_options(options)
"""

FIT = """
with strategy.scope():
    model = build()
    model.compile(optimizer=tf.keras.optimizers.SGD(0.05), loss="mse")
history = model.fit(dataset(), epochs=3, verbose=0)
weights = [w.tolist() for w in model.get_weights()]
epoch_losses = history.history["loss"]
"""

CUSTOM_LOOP = """
with strategy.scope():
    model = build()
    optimizer = tf.keras.optimizers.SGD(0.05)
@tf.function
def train_step(batch):
    def replica_step(xb, yb):
        with tf.GradientTape() as tape:
            per_example = tf.reduce_mean(tf.square(model(xb, training=True) - yb), axis=1)
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=GLOBAL_BATCH)
        optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))
        return loss
    return strategy.reduce("SUM", strategy.run(replica_step, args=batch), axis=None)
losses = []
for epoch in range(3):
    for batch in strategy.experimental_distribute_dataset(dataset()):
        losses.append(float(train_step(batch)))
        nbdist.report(step=len(losses) - 1, loss=losses[-1], samples=GLOBAL_BATCH // world_size)
weights = [w.tolist() for w in model.get_weights()]
"""


def reference(body: str) -> list[np.ndarray]:
    """The same training, one plain process, default strategy, whole global batch."""
    script = COMMON + "strategy = tf.distribute.get_strategy()\n"
    script += "class nbdist:\n    report = staticmethod(lambda **k: None)\n"
    script += "world_size = 1\n" + body + "\nimport json; print('WEIGHTS' + json.dumps(weights))"
    env = dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    env.pop("TF_CONFIG", None)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(ln for ln in done.stdout.splitlines() if ln.startswith("WEIGHTS"))
    return [np.asarray(w) for w in json.loads(line[len("WEIGHTS"):])]


@pytest.fixture(scope="module")
def tf_pool() -> Iterator[nbdist.Pool]:
    with nbdist.Pool(n=2, gpus="none") as p:  # CPU engines, also on a GPU machine
        yield p


def weights_on_every_rank(pool: nbdist.Pool) -> list[list[np.ndarray]]:
    return [[np.asarray(w) for w in pool.pull("weights", rank=r)] for r in range(2)]


def test_multiworker_fit_matches_one_process_with_the_global_batch(tf_pool: nbdist.Pool) -> None:
    dashboard = nbdist.Dashboard(keep_png=False)
    before = len(tf_pool.history)
    result = tf_pool.run(COMMON + FIT + "isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy), "
                         "strategy.num_replicas_in_sync", backend="tensorflow", observers=[dashboard])
    assert result.value == (True, 2)
    rank0, rank1 = weights_on_every_rank(tf_pool)
    for a, b in zip(rank0, rank1, strict=True):
        np.testing.assert_array_equal(a, b)  # the workers hold the very same weights
    for a, b in zip(rank0, reference(FIT), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    # The Keras callback, attached by itself to fit, fed the dashboard: 8 steps x 3 epochs per rank.
    frame = nbdist.history(tf_pool).iloc[before:]
    train = frame[frame.kind == "train"]
    for rank in (0, 1):
        mine = train[train["rank"] == rank]
        assert mine.step.tolist() == list(range(24)) and (mine.total == 24).all()
        assert mine.loss.notna().all() and (mine.samples == 16).all()  # half of the global batch each
        # Per-batch losses (Keras logs running means; the reporter recovers each batch's value)
        # average back to the epoch losses Keras reports.
        per_epoch = mine.loss.to_numpy().reshape(3, 8).mean(axis=1)
        np.testing.assert_allclose(per_epoch, tf_pool.pull("epoch_losses", rank=rank), rtol=1e-4)
    assert dashboard.points("loss") > 0


def test_multiworker_custom_loop_matches_one_process(tf_pool: nbdist.Pool) -> None:
    tf_pool.run(COMMON + CUSTOM_LOOP, backend="tensorflow")
    rank0, rank1 = weights_on_every_rank(tf_pool)
    for a, b in zip(rank0, rank1, strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(rank0, reference(CUSTOM_LOOP), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_multiworker_ranks_run_on_their_own_cores_with_one_op_at_a_time_per_core(tf_pool: nbdist.Pool) -> None:
    """Each worker's threads (TensorFlow's pools and gRPC's included) on the rank's own block of
    cores, and as many inter-op threads as cores in it: on 2 cores this ran 1.1-1.3x two plain
    TF_CONFIG processes, against 0.7-0.9x with all threads free and 2 inter-op threads each."""
    cores = frozenset(os.sched_getaffinity(0))
    threads = tf_pool.config.threads_per_engine
    if threads * 2 > len(cores):
        pytest.skip("fewer cores than engines: engines are left unpinned")
    tf_pool.run(COMMON + FIT + "import os\n"
                "_cpus = {frozenset(os.sched_getaffinity(int(t))) for t in os.listdir('/proc/self/task')}\n"
                "_inter = tf.config.threading.get_inter_op_parallelism_threads()", backend="tensorflow")
    ordered = sorted(cores)
    for rank in (0, 1):
        assert tf_pool.pull("_cpus", rank=rank) == {frozenset(ordered[rank * threads:(rank + 1) * threads])}
        assert tf_pool.pull("_inter", rank=rank) == threads


def test_tensorflow_log_noise_stays_out_of_the_cell(tf_pool: nbdist.Pool, capfd: pytest.CaptureFixture[str]) -> None:
    tf_pool.run("import tensorflow as tf\nprint('visible')\ntf.reduce_sum(tf.ones([4])).numpy()",
                backend="tensorflow", output="all")
    out, err = capfd.readouterr()
    assert "[rank 0] visible" in out and "[rank 1] visible" in out
    for noise in ("oneDNN", "cuInit", "cuda drivers", "absl::InitializeLog", "I0000"):
        assert noise not in out + err


def test_a_raising_tensorflow_rank_is_contained(tf_pool: nbdist.Pool) -> None:
    """Rank 1 raises while rank 0 waits in a collective all-reduce: the cell fails in seconds and
    the next cell runs on fresh engines, joined again."""
    cell = ("import tensorflow as tf\n"
            "if rank == 1:\n    raise ValueError('bad batch on rank 1')\n"
            "strategy.reduce('SUM', strategy.run(lambda: tf.constant(1.0)), axis=None)")
    started = time.monotonic()
    with pytest.raises(nbdist.DistributedCellError) as info:
        tf_pool.run(cell, backend="tensorflow")
    assert time.monotonic() - started < 60
    assert "bad batch on rank 1" in str(info.value)
    again = "import tensorflow as tf\nfloat(strategy.reduce('SUM', strategy.run(lambda: tf.constant(1.0)), axis=None))"
    value = tf_pool.run(again, backend="tensorflow").value
    assert value == 2.0


def test_switching_backend_asks_for_a_restart_then_performs_it(tf_pool: nbdist.Pool) -> None:
    tf_pool.run("1", backend="tensorflow")
    with pytest.raises(nbdist.PoolStateError, match="--restart"):
        tf_pool.run("1", backend="torch")
    assert tf_pool.run("import torch.distributed as dist\ndist.get_world_size()", backend="torch",
                       restart=True).value == 2
    assert tf_pool.backend == "torch"


def test_parameter_server_strategy_trains_with_variables_on_the_ps(tf_pool: nbdist.Pool) -> None:
    cell = COMMON + """
with strategy.scope():
    model = build()
    model.compile(optimizer=tf.keras.optimizers.SGD(0.05), loss="mse")
def dataset_fn(context):
    return tf.data.Dataset.from_tensor_slices((x, y)).shuffle(256, seed=0).repeat().batch(GLOBAL_BATCH)
history = model.fit(tf.keras.utils.experimental.DatasetCreator(dataset_fn), epochs=4, steps_per_epoch=8, verbose=0)
(isinstance(strategy, tf.distribute.ParameterServerStrategy), type(coordinator).__name__, history.history["loss"],
 sorted({v.device for v in model.variables}))
"""
    before = len(tf_pool.history)
    name, coordinator, losses, devices = tf_pool.run(cell, backend="tensorflow", strategy="ps", ps=1,
                                                     restart=True).value
    assert (name, coordinator) == (True, "ClusterCoordinator")
    assert losses[-1] < 0.5 * losses[0]
    assert devices == ["/job:ps/replica:0/task:0/device:CPU:0"]
    rows = [s.device for s in tf_pool.status()]
    assert rows[0].startswith("chief") and rows[1].startswith("ps 0")
    # Epoch losses reach the dashboard (per-batch values stay remote under this strategy).
    frame = nbdist.history(tf_pool).iloc[before:]
    train = frame[(frame.kind == "train") & frame.loss.notna()]
    assert len(train) == 4 and set(train["rank"]) == {0}


def test_mirrored_strategy_replicates_over_one_engines_devices(tf_pool: nbdist.Pool) -> None:
    cell = COMMON + FIT + "isinstance(strategy, tf.distribute.MirroredStrategy), strategy.num_replicas_in_sync, rank"
    assert tf_pool.run(cell, backend="tensorflow", strategy="mirrored", restart=True).value == (True, 2, 0)
    for a, b in zip(tf_pool.pull("weights", rank=0), reference(FIT), strict=True):
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-4, atol=1e-5)


def test_only_tensorflows_own_grpc_servers_listen_beyond_loopback(tf_pool: nbdist.Pool) -> None:
    """TensorFlow binds its gRPC servers to 0.0.0.0 whatever address TF_CONFIG gives (hardcoded
    in grpc_server_lib.cc): the known exposure the README states. Nothing else may listen there."""
    workers = tf_pool.run("import json, os\njson.loads(os.environ['TF_CONFIG'])['cluster']['worker']",
                          backend="tensorflow", strategy="multiworker", restart=True).value
    assert all(address.startswith("127.0.0.1:") for address in workers)
    exposed = not_loopback(listeners(pool_processes(tf_pool)))
    assert {port for _, _, port in exposed} == {int(a.rpartition(":")[2]) for a in workers}


def test_an_interrupt_inside_tensorflow_replaces_the_engines(tf_pool: nbdist.Pool) -> None:
    """TensorFlow's collectives cannot resume after an interrupt (the next one failed with
    "Collective instance ... expected type"): the engines are replaced, and the user told."""
    tf_pool.run(COMMON + "1", backend="tensorflow")
    main = threading.get_ident()
    timer = threading.Timer(8.0, lambda: signal.pthread_kill(main, signal.SIGINT))
    timer.start()
    started = time.monotonic()
    with pytest.raises(nbdist.DistributedCellError) as info:
        tf_pool.run(COMMON + FIT.replace("epochs=3", "epochs=100000"), backend="tensorflow")
    timer.join()
    assert info.value.lost_state and time.monotonic() - started < 60
    assert "interrupted" in info.value.summary
    assert "stopped inside TensorFlow" in info.value.summary or "were killed" in info.value.summary
    again = tf_pool.run(COMMON + FIT + "strategy.num_replicas_in_sync", backend="tensorflow")
    assert again.value == 2
