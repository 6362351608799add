"""nbdist against its baselines, measured in one run on this machine; prints a table.

    python benchmarks/run.py            # everything (about 10 minutes on 2 cores), writes results.png
    python benchmarks/run.py --quick    # fewer repeats
    python benchmarks/run.py --no-peers # without installing nbdistributed and Accelerate

Every figure is a ratio against a baseline run in the same process, same minute: raw
ipyparallel, nbdistributed and Accelerate's notebook_launcher (installed into
benchmarks/.peers by peers/setup.py) for start and round trip, `torchrun --nproc_per_node=2`
for throughput.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nbdist
from nbdist import Dashboard

HERE = Path(__file__).resolve().parent


def pair(i: int, baseline, ours) -> None:  # type: ignore[no-untyped-def]
    """Run both sides of one round, the baseline first in even rounds and second in odd ones."""
    for run in (baseline, ours) if i % 2 == 0 else (ours, baseline):
        run()


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


def torchrun_rate(steps: int, nproc: int = 2) -> float:
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // nproc)))
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
         str(HERE / "workload.py"), f"--steps={steps}"],
        capture_output=True, text=True, env=env, cwd=HERE, timeout=300,
    )
    out = done.stdout
    match = re.search(r"STEPS_PER_S ([0-9.]+)", out)
    if match is None:  # a failure at teardown, after the rate was printed, does not void the rate
        raise RuntimeError(f"torchrun failed:\n{done.stdout}\n{done.stderr[-3000:]}")
    return float(match.group(1))


def torchrun_parallel(strategy: str, steps: int) -> tuple[float, float, float]:
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // 2)))
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
         str(HERE / "parallel_workload.py"), f"--strategy={strategy}", f"--steps={steps}"],
        capture_output=True, text=True, env=env, cwd=HERE, timeout=600,
    )
    match = re.search(r"STEPS_PER_S ([0-9.]+) MODEL_MB ([0-9.]+) PEAK_MB ([0-9.-]+)", done.stdout)
    if match is None:
        raise RuntimeError(f"torchrun {strategy} failed:\n{done.stdout}\n{done.stderr[-3000:]}")
    return float(match.group(1)), float(match.group(2)), float(match.group(3))


def nbdist_parallel(pool: nbdist.Pool, strategy: str, steps: int) -> tuple[float, float, float]:
    result = pool.run(
        f"import sys\nsys.path.insert(0, {str(HERE)!r})\nfrom parallel_workload import train\n"
        f"train({strategy!r}, steps={steps})",
        strategy=strategy,
    )
    rate, mb, peak = result.value
    return float(rate), float(mb), float(peak)


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


DASHBOARD = Dashboard(keep_png=False)  # reused from cell to cell, as `%%distributed` does


def nbdist_rate(pool: nbdist.Pool, steps: int, report: bool = False, dashboard: bool = False,
                width: int = 512) -> float:
    observers = [DASHBOARD] if dashboard else []
    result = pool.run(
        f"import sys\nsys.path.insert(0, {str(HERE)!r})\nfrom workload import train\n"
        f"train(steps={steps}, report={report}, width={width})",
        observers=observers,
    )
    return float(result.value)


def whole_cell_rate(pool: nbdist.Pool, steps: int, tensorboard: str | None,
                    written_after: list[float] | None = None) -> float:
    """Steps per second of wall time around the whole cell, the dashboard on: what handing the
    records to the TensorBoard writer when the cell ends (`tensorboard`) adds is counted too. The
    events are written after the cell returns, by an idle-priority helper process; the seconds
    until they are on disk go to `written_after`, waited for outside the timing so that they do
    not fall into the next measured cell."""
    t = time.perf_counter()
    pool.run(f"import sys\nsys.path.insert(0, {str(HERE)!r})\nfrom workload import train\n"
             f"train(steps={steps}, report=True, width=64)", observers=[DASHBOARD], tensorboard=tensorboard)
    rate = steps / (time.perf_counter() - t)
    if tensorboard is not None:
        returned = time.perf_counter()
        nbdist.flush_tensorboard()
        if written_after is not None:
            written_after.append(time.perf_counter() - returned)
    return rate


def raw_ipp_cold() -> float:
    """The baseline by hand: a plain `ipp.Cluster`, then the user's own process-group setup."""
    import logging

    import ipyparallel as ipp

    t = time.perf_counter()
    cluster = ipp.Cluster(n=2, controller_ip="127.0.0.1", log_level=logging.ERROR)
    try:
        client = cluster.start_and_connect_sync()
        client.wait_for_engines(2, timeout=120)
        view = client[:]
        view.scatter("rank", [0, 1], flatten=True, block=True)
        view.execute(
            "import os, torch, torch.distributed as dist\n"
            f"os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT='{free_port()}')\n"
            "dist.init_process_group('gloo', rank=rank, world_size=2)\nworld = dist.get_world_size()",
            block=True,
        )
        assert view.pull("world", block=True) == [2, 2]
        return time.perf_counter() - t
    finally:
        cluster.stop_cluster_sync()


def scaling_row(steps: int) -> tuple[float, float, float]:
    """Samples/s at 1 and 2 engines (fresh pools; 64 samples per rank per step) and the efficiency."""
    from nbdist import scaling_report

    report = scaling_report(f"train(steps={steps}, report=True)", (1, 2),
                            setup=f"import sys\nsys.path.insert(0, {str(HERE)!r})\nfrom workload import train\n"
                                  "train(steps=20)")
    one, two = report.table.samples_per_s.tolist()
    return one, two, float(report.table.efficiency.iloc[1])


def measure_peers(steps: int, repeats: int) -> tuple[dict[str, dict[str, float]], dict[str, str]]:
    """Each peer in its own subprocess (their install on PYTHONPATH only there)."""
    from peers import setup

    versions = setup.ensure()
    results = {}
    env = dict(setup.env(), OMP_NUM_THREADS="1")
    for name, args in (("nbdistributed", [str(HERE), str(steps), str(repeats)]),
                       ("accelerate", [str(HERE), str(steps)]), ("monarch", [str(repeats)])):
        done = subprocess.run([sys.executable, str(HERE / "peers" / f"{name}_peer.py"), *args], capture_output=True,
                              text=True, env=env, cwd=HERE, timeout=900)
        lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
        if done.returncode != 0 or not lines:
            raise RuntimeError(f"peer {name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        results[name] = json.loads(lines[-1])
    return results, versions


def chart(ratios: list[tuple[str, float, float]], path: Path) -> None:
    """Bars of nbdist against each baseline (>1: nbdist better), on a log scale, goals marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 0.5 + 0.45 * len(ratios)))
    names = [r[0] for r in ratios]
    values = [r[1] for r in ratios]
    colors = ["tab:green" if v >= g else "tab:red" for _, v, g in ratios]
    ax.barh(names, values, color=colors)
    ax.set_xscale("log")
    ax.axvline(1.0, color="black", lw=1)
    for i, (_, v, g) in enumerate(ratios):
        ax.plot([g, g], [i - 0.4, i + 0.4], color="black", lw=2)  # the goal
        ax.text(v, i, f" {v:.2f}x", va="center", fontsize=8)
    ax.set_xlabel("nbdist / baseline, >1 is better (log scale; tick: goal; green: met)")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-peers", action="store_true", help="skip nbdistributed and Accelerate")
    args = parser.parse_args()
    repeats = 20 if args.quick else 50
    steps = 300 if args.quick else 600
    rounds = 2 if args.quick else 5
    dash_steps = 12000  # ~20 s of a 400+ steps/s cell: the dashboard's first draw is paid once per cell
    rows: list[tuple[str, str, str, str]] = []
    ratios: list[tuple[str, float, float]] = []  # (measure, speed ratio where >1 is better, goal)
    peers, versions = ({}, {}) if args.no_peers else measure_peers(steps, repeats)
    nbd, acc, mon = peers.get("nbdistributed"), peers.get("accelerate"), peers.get("monarch")

    raw_cold = raw_ipp_cold()
    t0 = time.perf_counter()
    pool = nbdist.Pool(n=2).start()
    started = time.perf_counter() - t0
    pool.run("import torch.distributed as dist\ndist.get_world_size()")
    first = time.perf_counter() - t0
    cold_base = f"(engines up in {started:.2f} s) raw ipp.Cluster + manual setup {raw_cold:.2f} s"
    cold_ratio = f"{first / raw_cold:.2f}x raw"
    ratios.append(("cold start vs raw ipyparallel", raw_cold / first, 1.0))
    if nbd and acc and mon:
        fastest = min(nbd["cold_s"], acc["cold_s"], mon["cold_s"])
        cold_base += (f"; nbdistributed {nbd['cold_s']:.2f} s; notebook_launcher {acc['cold_s']:.2f} s; "
                      f"torchmonarch {mon['cold_s']:.2f} s")
        cold_ratio += (f", {first / nbd['cold_s']:.2f}x nbdistributed, {first / acc['cold_s']:.2f}x notebook_launcher, "
                       f"{first / mon['cold_s']:.2f}x torchmonarch")
        ratios.append(("cold start vs nbdistributed", nbd["cold_s"] / first, 1.0))
        ratios.append(("cold start vs fastest peer", fastest / first, 1.0))
    rows.append(("cold start: Pool.start + first cell (torch, process group)", f"{first:.2f} s", cold_base,
                 cold_ratio))
    try:
        view_all = pool.views[0].client[[e.engine_id for e in pool.engines]]
        empty = median_ms(lambda: pool.run(""), repeats)
        raw_all = median_ms(lambda: view_all.apply_sync(lambda: None), repeats)
        raw_one = median_ms(lambda: pool.views[0].apply_sync(lambda: None), repeats)
        warm_base = f"apply_sync on both engines {raw_all:.2f} ms / one engine {raw_one:.2f} ms"
        if nbd and mon:
            warm_base += (f"; nbdistributed {nbd['warm_ms']:.1f} ms; torchmonarch no-op endpoint on both actors "
                          f"{mon['warm_ms']:.2f} ms")
        rows.append((f"warm empty cell, median of {repeats}", f"{empty:.2f} ms", warm_base,
                     f"{empty / raw_all:.2f}x / {empty / raw_one:.2f}x (goal <= 1.5x one engine)"))
        ratios.append(("warm cell vs apply_sync on one engine", raw_one / empty, 1 / 1.5))
        if nbd and mon:
            ratios.append(("warm cell vs nbdistributed", nbd["warm_ms"] / empty, 1.0))
            ratios.append(("warm cell vs torchmonarch round trip", mon["warm_ms"] / empty, 1.0))

        nbdist_rate(pool, 50)  # warm: imports, DDP construction paths
        ours, theirs, dash_on, dash_off, tb_on, tb_off = [], [], [], [], [], []
        tb_written: list[float] = []
        events = tempfile.mkdtemp(prefix="nbdist-bench-tb-")
        for i in range(rounds):
            # Order alternates between rounds: this machine's speed drifts by several percent
            # over a minute, which a fixed order would charge to one side.
            pair(i, lambda: theirs.append(torchrun_rate(steps)), lambda: ours.append(nbdist_rate(pool, steps)))
            # A small model, so report() runs 400+ times a second per rank (the goal's rate), for ~20 s.
            pair(i, lambda: dash_off.append(nbdist_rate(pool, dash_steps, report=True, width=64)),
                 lambda: dash_on.append(nbdist_rate(pool, dash_steps, report=True, dashboard=True, width=64)))
            pair(i, lambda: tb_off.append(whole_cell_rate(pool, dash_steps, None)),
                 lambda: tb_on.append(whole_cell_rate(pool, dash_steps, events, tb_written)))
        ours_m, theirs_m = statistics.median(ours), statistics.median(theirs)
        through_base = f"torchrun --nproc_per_node=2: {theirs_m:.1f}"
        if nbd and acc:
            through_base += (f"; nbdistributed {nbd['steps_per_s']:.1f} ({nbd['steps_per_s'] / theirs_m:.3f}x), "
                             f"notebook_launcher {acc['steps_per_s']:.1f} ({acc['steps_per_s'] / theirs_m:.3f}x)")
        rows.append((f"DDP MLP throughput, steps/s per rank (median of {rounds})", f"{ours_m:.1f}",
                     through_base, f"{ours_m / theirs_m:.3f}x (goal >= 0.98x)"))
        ratios.append(("DDP throughput vs torchrun", ours_m / theirs_m, 0.98))
        if acc:
            t = time.perf_counter()
            nbdist_rate(pool, 50)
            rerun = time.perf_counter() - t
            rows.append(("re-run cost: a second 50-step training cell", f"{rerun:.2f} s",
                         f"notebook_launcher re-launching its workers: {acc['rerun_s']:.2f} s",
                         f"{rerun / acc['rerun_s']:.2f}x"))
            ratios.append(("re-run cost vs notebook_launcher", acc["rerun_s"] / rerun, 1.0))
        on_m, off_m = statistics.median(dash_on), statistics.median(dash_off)
        rows.append(("report() every step, dashboard on vs off (small MLP)", f"{on_m:.1f} steps/s",
                     f"dashboard off: {off_m:.1f} steps/s", f"{on_m / off_m:.3f}x (goal >= 0.98x)"))
        ratios.append(("dashboard on vs off", on_m / off_m, 0.98))
        tb_m, no_tb_m = statistics.median(tb_on), statistics.median(tb_off)
        rows.append(("dashboard + --tensorboard vs dashboard alone (steps / wall s of the whole cell; "
                     f"events on disk {statistics.median(tb_written):.1f} s after it returns)",
                     f"{tb_m:.1f}", f"without --tensorboard: {no_tb_m:.1f}", f"{tb_m / no_tb_m:.3f}x (goal >= 0.98x)"))
        ratios.append(("--tensorboard on vs off", tb_m / no_tb_m, 0.98))
        shutil.rmtree(events, ignore_errors=True)

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

        par_steps = 150 if args.quick else 300
        for strategy in ("fsdp", "pipeline", "tensor"):
            nbdist_parallel(pool, strategy, 10)  # warm
            ours_p, theirs_p = [], []
            for i in range(rounds):
                pair(i, lambda: theirs_p.append(torchrun_parallel(strategy, par_steps)),  # noqa: B023
                     lambda: ours_p.append(nbdist_parallel(pool, strategy, par_steps)))  # noqa: B023
            ours_m = statistics.median(r for r, _, _ in ours_p)
            theirs_m = statistics.median(r for r, _, _ in theirs_p)
            ours_peak = statistics.median(p for _, _, p in ours_p)
            theirs_peak = statistics.median(p for _, _, p in theirs_p)
            rows.append((f"--strategy {strategy}: steps/s; model state MB; peak RSS MB (rank 0)",
                         f"{ours_m:.1f}; {ours_p[0][1]:.2f}; {ours_peak:.1f}",
                         f"torchrun: {theirs_m:.1f}; {theirs_p[0][1]:.2f}; {theirs_peak:.1f}",
                         f"{ours_m / theirs_m:.3f}x (goal >= 0.98x)"))
            ratios.append((f"{strategy} vs torchrun", ours_m / theirs_m, 0.98))

        pool.stop()  # the scaling row starts its own pools of 1 and 2 engines
        one, two, efficiency = scaling_row(steps)
        rows.append(("scaling: samples/s at 1 -> 2 engines (fresh pools, 64 samples/rank/step)",
                     f"{two:.0f}", f"1 engine (all {os.cpu_count()} cores): {one:.0f}",
                     f"speedup {two / one:.2f}x, efficiency {efficiency:.2f}"))
        pool.start()

        tf_steps = 200 if args.quick else 400
        tf_nbdist_rate(pool, 20)  # switch the pool to TensorFlow (a restart) and warm it
        tf_ours, tf_theirs = [], []
        for i in range(rounds):
            pair(i, lambda: tf_theirs.append(tf_plain_rate(tf_steps)),
                 lambda: tf_ours.append(tf_nbdist_rate(pool, tf_steps)))
        ours_m, theirs_m = statistics.median(tf_ours), statistics.median(tf_theirs)
        rows.append((f"TF MultiWorkerMirrored Keras fit, steps/s per worker (median of {rounds})", f"{ours_m:.1f}",
                     f"2 processes, hand-written TF_CONFIG: {theirs_m:.1f}",
                     f"{ours_m / theirs_m:.3f}x (goal >= 0.98x)"))
        ratios.append(("TF multiworker vs plain TF_CONFIG", ours_m / theirs_m, 0.98))
    finally:
        pool.stop()

    import torch

    print(f"\nnbdist benchmarks on {platform.node()} ({os.cpu_count()} cores, {platform.machine()}, "
          f"Python {platform.python_version()}, torch {torch.__version__}"
          + "".join(f", {k} {v}" for k, v in versions.items()) + ")\n")
    chart(ratios, HERE / "results.png")
    widths = [max(len(r[i]) for r in rows + [("measure", "nbdist", "baseline", "ratio")]) for i in range(4)]
    header = ("measure", "nbdist", "baseline", "ratio")
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print(" | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))


if __name__ == "__main__":
    main()
