"""Failure containment on a real pool: the notebook never hangs, state loss is said plainly.

Bounds on time are generous: they only turn a hang into a failure. The measured times
are printed by benchmarks/run.py (its raise and kill -9 rows).
"""

from __future__ import annotations

import os
import signal
import threading
import time

import psutil
import pytest
from _procs import wait_gone

import nbdist

pytestmark = pytest.mark.integration

HANG_BOUND = 30.0


def test_rank_raises_while_others_wait_in_a_collective(pool: nbdist.Pool) -> None:
    pool.run("import torch, torch.distributed as dist\nkept = 1")
    started = time.monotonic()
    with pytest.raises(nbdist.DistributedCellError) as info:
        pool.run("if rank == 1:\n    raise RuntimeError('loss is nan')\ndist.barrier()\n")
    elapsed = time.monotonic() - started
    assert elapsed < HANG_BOUND
    err = info.value
    assert err.ranks == [1] and "loss is nan" in err.tracebacks[1]
    assert err.lost_state and "every variable on the engines is lost" in err.summary
    # The next cell works with no action from the user, on a re-formed process group.
    reduced = pool.run("import torch, torch.distributed as dist\nt = torch.ones(1)\ndist.all_reduce(t)\nt.item()")
    assert reduced.value == 2.0
    assert pool.run("'kept' in globals()").value is False


def test_every_rank_raising_keeps_state(pool: nbdist.Pool) -> None:
    pool.run("kept = 5")
    with pytest.raises(nbdist.DistributedCellError) as info:
        pool.run("undefined_name + 1")
    assert info.value.ranks == [0] and "ranks 0, 1" in info.value.summary
    assert not info.value.lost_state
    assert pool.run("kept").value == 5


def test_killed_engine_is_reported_with_rank_and_signal(pool: nbdist.Pool) -> None:
    started = time.monotonic()
    with pytest.raises(nbdist.DistributedCellError) as info:
        pool.run("import os, torch.distributed as dist\nif rank == 1:\n    os.kill(os.getpid(), 9)\n"
                 "dist.barrier()")
    assert time.monotonic() - started < HANG_BOUND
    summary = info.value.summary
    assert "rank 1" in summary and "SIGKILL" in summary and pool.engines[1].host in summary
    assert info.value.lost_state
    assert pool.run("world_size").value == 2


def test_timeout_interrupts_python_code_and_keeps_state(pool: nbdist.Pool) -> None:
    pool.run("kept = 7")
    with pytest.raises(nbdist.DistributedCellError) as info:
        pool.run("import time\ntime.sleep(600)", timeout=1.0)
    assert "timed out after 1 s" in info.value.summary and not info.value.lost_state
    assert pool.run("kept").value == 7


def test_timeout_in_a_collective_frees_the_ranks(pool: nbdist.Pool) -> None:
    started = time.monotonic()
    with pytest.raises(nbdist.DistributedCellError) as info:
        pool.run("import time, torch.distributed as dist\nif rank == 0:\n    dist.barrier()\n"
                 "else:\n    time.sleep(600)", timeout=1.0)
    assert time.monotonic() - started < HANG_BOUND
    assert "timed out" in info.value.summary and info.value.lost_state
    assert pool.run("rank").value == 0


def test_kernel_interrupt_stops_every_rank(pool: nbdist.Pool) -> None:
    main = threading.get_ident()
    timer = threading.Timer(1.0, lambda: signal.pthread_kill(main, signal.SIGINT))
    timer.start()
    started = time.monotonic()
    with pytest.raises(nbdist.DistributedCellError) as info:
        pool.run("import time\nfor _ in range(600):\n    time.sleep(0.1)")
    timer.join()
    assert time.monotonic() - started < 1.0 + 5.0
    assert "interrupted" in info.value.summary
    assert pool.run("1 + 1").value == 2


def test_stop_leaves_no_process_behind() -> None:
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    p = nbdist.Pool(n=2, gpus="none").start()
    started = {c.pid for c in me.children(recursive=True)} - before
    assert len(started) >= 3, "expected a controller and two engines"
    p.stop()
    left = wait_gone(started, 10)  # stop() has returned; allow exits to be reaped
    assert [psutil.Process(pid).cmdline() for pid in left] == []
    p.stop()  # twice is fine
    assert os.getpid() == me.pid


def test_engine_killed_between_cells_is_recovered_before_the_next(pool: nbdist.Pool,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    pool.run("kept = 1")
    victim = pool.engines[0].pid
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while not pool.exits() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pool.run("world_size").value == 2
    assert f"engine pid {victim}" in capsys.readouterr().err
    assert pool.run("'kept' in globals()").value is False
