"""nbdist against its baselines, measured in one run on this machine; prints a table.

    python benchmarks/run.py            # everything (about 3 minutes on 2 cores)
    python benchmarks/run.py --quick    # fewer repeats

Every figure is a ratio against a baseline run in the same process, same minute:
raw ipyparallel for the cell round trip, `torchrun --nproc_per_node=2` for throughput.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import nbdist
from nbdist.dashboard import Dashboard

HERE = Path(__file__).resolve().parent


def median_ms(fn, repeats: int) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def torchrun_rate(steps: int) -> float:
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // 2)))
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
         str(HERE / "workload.py"), f"--steps={steps}"],
        capture_output=True, text=True, env=env, cwd=HERE, timeout=300,
    )
    out = done.stdout
    match = re.search(r"STEPS_PER_S ([0-9.]+)", out)
    if match is None:  # a failure at teardown, after the rate was printed, does not void the rate
        raise RuntimeError(f"torchrun failed:\n{done.stdout}\n{done.stderr[-3000:]}")
    return float(match.group(1))


def torchrun_parallel(strategy: str, steps: int) -> tuple[float, float]:
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // 2)))
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
         str(HERE / "parallel_workload.py"), f"--strategy={strategy}", f"--steps={steps}"],
        capture_output=True, text=True, env=env, cwd=HERE, timeout=600,
    )
    match = re.search(r"STEPS_PER_S ([0-9.]+) MODEL_MB ([0-9.]+)", done.stdout)
    if match is None:
        raise RuntimeError(f"torchrun {strategy} failed:\n{done.stdout}\n{done.stderr[-3000:]}")
    return float(match.group(1)), float(match.group(2))


def nbdist_parallel(pool: nbdist.Pool, strategy: str, steps: int) -> tuple[float, float]:
    result = pool.run(
        f"import sys\nsys.path.insert(0, {str(HERE)!r})\nfrom parallel_workload import train\n"
        f"train({strategy!r}, steps={steps})",
        strategy=strategy,
    )
    rate, mb = result.value
    return float(rate), float(mb)


def tf_plain_rate(steps: int) -> float:
    """Two plain processes with hand-written TF_CONFIG, as in TensorFlow's multi-worker tutorial."""
    ports = [free_port(), free_port()]
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    procs = []
    for index in range(2):
        env = dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="",
                   TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}))
        procs.append(subprocess.Popen([sys.executable, str(HERE / "tf_workload.py"), f"--steps={steps}"],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=HERE))
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=True):
        if p.returncode != 0:
            raise RuntimeError(f"plain TF worker failed:\n{out}\n{err[-3000:]}")
    match = re.search(r"STEPS_PER_S ([0-9.]+)", outs[0][0])
    assert match, outs[0]
    return float(match.group(1))


def tf_nbdist_rate(pool: nbdist.Pool, steps: int) -> float:
    result = pool.run(
        f"import sys\nsys.path.insert(0, {str(HERE)!r})\nfrom tf_workload import train\n"
        f"train(strategy, steps={steps})",
        backend="tensorflow", restart=True,
    )
    return float(result.value)


def nbdist_rate(pool: nbdist.Pool, steps: int, report: bool = False, dashboard: bool = False,
                width: int = 512) -> float:
    observers = [Dashboard(keep_png=False)] if dashboard else []
    result = pool.run(
        f"import sys\nsys.path.insert(0, {str(HERE)!r})\nfrom workload import train\n"
        f"train(steps={steps}, report={report}, width={width})",
        observers=observers,
    )
    return float(result.value)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    repeats = 20 if args.quick else 50
    steps = 300 if args.quick else 600
    rounds = 2 if args.quick else 3
    dash_steps = 12000  # ~20 s of a 400+ steps/s cell: the dashboard's first draw is paid once per cell
    rows: list[tuple[str, str, str, str]] = []

    t0 = time.perf_counter()
    pool = nbdist.Pool(n=2).start()
    started = time.perf_counter() - t0
    pool.run("import torch.distributed as dist\ndist.get_world_size()")
    first = time.perf_counter() - t0
    rows.append(("cold start: Pool.start + first cell (torch, process group)", f"{first:.2f} s",
                 f"engines up in {started:.2f} s", ""))
    try:
        view_all = pool.views[0].client[[e.engine_id for e in pool.engines]]
        empty = median_ms(lambda: pool.run(""), repeats)
        raw_all = median_ms(lambda: view_all.apply_sync(lambda: None), repeats)
        raw_one = median_ms(lambda: pool.views[0].apply_sync(lambda: None), repeats)
        rows.append((f"warm empty cell, median of {repeats}", f"{empty:.2f} ms",
                     f"apply_sync on both engines {raw_all:.2f} ms / one engine {raw_one:.2f} ms",
                     f"{empty / raw_all:.2f}x / {empty / raw_one:.2f}x (goal <= 2x)"))

        nbdist_rate(pool, 50)  # warm: imports, DDP construction paths
        ours, theirs, dash_on, dash_off = [], [], [], []
        for _ in range(rounds):
            theirs.append(torchrun_rate(steps))
            ours.append(nbdist_rate(pool, steps))
            # A small model, so report() runs 400+ times a second per rank (the goal's rate), for ~20 s.
            dash_off.append(nbdist_rate(pool, dash_steps, report=True, width=64))
            dash_on.append(nbdist_rate(pool, dash_steps, report=True, dashboard=True, width=64))
        ours_m, theirs_m = statistics.median(ours), statistics.median(theirs)
        rows.append((f"DDP MLP throughput, steps/s per rank (median of {rounds})", f"{ours_m:.1f}",
                     f"torchrun --nproc_per_node=2: {theirs_m:.1f}", f"{ours_m / theirs_m:.3f}x (goal >= 0.98x)"))
        on_m, off_m = statistics.median(dash_on), statistics.median(dash_off)
        rows.append(("report() every step, dashboard on vs off (small MLP)", f"{on_m:.1f} steps/s",
                     f"dashboard off: {off_m:.1f} steps/s", f"{on_m / off_m:.3f}x (goal >= 0.98x)"))

        t = time.perf_counter()
        try:
            pool.run("import torch.distributed as dist\nif rank == 1:\n    raise RuntimeError('x')\ndist.barrier()")
        except nbdist.DistributedCellError:
            pass
        raised = time.perf_counter() - t
        t = time.perf_counter()
        try:
            pool.run("import os, torch.distributed as dist\nif rank == 1:\n    os.kill(os.getpid(), 9)\n"
                     "dist.barrier()")
        except nbdist.DistributedCellError:
            pass
        killed = time.perf_counter() - t
        t = time.perf_counter()
        pool.run("import torch.distributed as dist\ndist.get_world_size()")
        reform = time.perf_counter() - t
        rows.append(("rank raises, other blocked in barrier: cell fails after", f"{raised:.2f} s",
                     f"grace {pool.config.grace:g} s + engine restart", "goal <= 10 s"))
        rows.append(("engine kill -9 mid-collective: reported and recovered after", f"{killed:.2f} s",
                     f"next cell re-forms the group in {reform:.2f} s", "goal <= 10 s"))

        par_steps = 60 if args.quick else 150
        for strategy in ("fsdp", "pipeline", "tensor"):
            nbdist_parallel(pool, strategy, 10)  # warm
            ours_p, theirs_p = [], []
            for _ in range(rounds):
                theirs_p.append(torchrun_parallel(strategy, par_steps))
                ours_p.append(nbdist_parallel(pool, strategy, par_steps))
            ours_m = statistics.median(r for r, _ in ours_p)
            theirs_m = statistics.median(r for r, _ in theirs_p)
            rows.append((f"--strategy {strategy}: steps/s per rank, model state MB on rank 0", f"{ours_m:.1f}, "
                         f"{ours_p[0][1]:.2f} MB", f"torchrun: {theirs_m:.1f}, {theirs_p[0][1]:.2f} MB",
                         f"{ours_m / theirs_m:.3f}x (goal >= 0.98x)"))

        tf_steps = 200 if args.quick else 400
        tf_nbdist_rate(pool, 20)  # switch the pool to TensorFlow (a restart) and warm it
        tf_ours, tf_theirs = [], []
        for _ in range(rounds):
            tf_theirs.append(tf_plain_rate(tf_steps))
            tf_ours.append(tf_nbdist_rate(pool, tf_steps))
        ours_m, theirs_m = statistics.median(tf_ours), statistics.median(tf_theirs)
        rows.append((f"TF MultiWorkerMirrored Keras fit, steps/s per worker (median of {rounds})", f"{ours_m:.1f}",
                     f"2 processes, hand-written TF_CONFIG: {theirs_m:.1f}",
                     f"{ours_m / theirs_m:.3f}x (goal >= 0.98x)"))
    finally:
        pool.stop()

    print(f"\nnbdist benchmarks on {platform.node()} ({os.cpu_count()} cores, {platform.machine()}, "
          f"Python {platform.python_version()})\n")
    widths = [max(len(r[i]) for r in rows + [("measure", "nbdist", "baseline", "ratio")]) for i in range(4)]
    header = ("measure", "nbdist", "baseline", "ratio")
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print(" | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))


if __name__ == "__main__":
    main()
