"""A real Grid Engine (Debian's gridengine 8.1.9) on this machine: sge_qmaster and sge_execd
started as root, one queue, root allowed to submit. Pools are started with `--launcher sge`, so
every job is a real `qsub` (an array job, one task per engine).

Needs root and gridengine-master, -exec and -client; .ci/run installs them.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from _notebook import DDP_CELL, fresh_notebook, one_process
from IPython.core.interactiveshell import InteractiveShell

import nbdist
from nbdist.kernel._magics import NbdistMagics

pytestmark = pytest.mark.integration

SGE_ROOT, CELL = Path("/var/lib/gridengine"), "default"
QUEUE = """qname all.q
hostlist {host}
seq_no 0
load_thresholds NONE
suspend_thresholds NONE
nsuspend 1
suspend_interval 00:05:00
priority 0
min_cpu_interval 00:05:00
processors UNDEFINED
qtype BATCH INTERACTIVE
ckpt_list NONE
pe_list NONE
rerun FALSE
slots 4
tmpdir /tmp
shell /bin/sh
prolog NONE
epilog NONE
shell_start_mode unix_behavior
starter_method NONE
suspend_method NONE
resume_method NONE
terminate_method NONE
notify 00:00:60
owner_list NONE
user_lists NONE
xuser_lists NONE
subordinate_list NONE
complex_values NONE
projects NONE
xprojects NONE
calendar NONE
initial_state default
"""
LIMITS = ("s_rt", "h_rt", "s_cpu", "h_cpu", "s_fsize", "h_fsize", "s_data", "h_data", "s_stack", "h_stack",
          "s_core", "h_core", "s_rss", "h_rss", "s_vmem", "h_vmem")


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=30)


def qstat() -> list[str]:
    lines = sh("qstat", "-u", "*", check=False).stdout.splitlines()
    return [line for line in lines[2:] if line.strip()]


def _edit(show: list[str], load: str, path: Path, changes: dict[str, str]) -> None:
    text = sh(*show).stdout
    for key, value in changes.items():
        text = re.sub(rf"^{key}\s+.*$", f"{key} {value}", text, flags=re.M)
    path.write_text(text)
    sh("qconf", load, str(path))


@pytest.fixture(scope="module")
def sge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    if os.geteuid() != 0 or not Path("/usr/sbin/sge_qmaster").exists() or not shutil.which("qsub"):
        pytest.skip("needs root and Debian's gridengine packages (.ci/run installs them)")
    d = tmp_path_factory.mktemp("sge")
    host = os.uname().nodename
    os.environ.update(SGE_ROOT=str(SGE_ROOT), SGE_CELL=CELL)
    common = SGE_ROOT / CELL / "common"
    (common / "act_qmaster").write_text(f"{host}\n")
    (common / "host_aliases").write_text(f"{host} localhost\n")  # 127.0.0.1 reads back as localhost
    started = time.monotonic()
    if not subprocess.run(["pgrep", "-x", "sge_qmaster"], capture_output=True).stdout:
        sh("/usr/sbin/sge_qmaster")
    while sh("qconf", "-sh", check=False).returncode != 0:
        if time.monotonic() - started > 30:
            pytest.skip("sge_qmaster did not answer within 30 s")
        time.sleep(0.2)
    for flag in ("-ah", "-as"):
        sh("qconf", flag, host, check=False)
    _edit(["qconf", "-sconf"], "-Mconf", d / "global", {"min_uid": "0", "min_gid": "0"})
    _edit(["qconf", "-ssconf"], "-Msconf", d / "sconf",
          {"schedule_interval": "0:0:1", "flush_submit_sec": "1", "flush_finish_sec": "1"})
    if not subprocess.run(["pgrep", "-x", "sge_execd"], capture_output=True).stdout:
        sh("/usr/sbin/sge_execd")
    if "all.q" not in sh("qconf", "-sql", check=False).stdout:
        queue = d / "all.q"
        queue.write_text(QUEUE.format(host=host) + "".join(f"{limit} INFINITY\n" for limit in LIMITS))
        sh("qconf", "-Aq", str(queue))
    while "all.q@" not in sh("qstat", "-f", check=False).stdout:
        if time.monotonic() - started > 30:
            pytest.skip("sge_execd did not join within 30 s")
        time.sleep(0.2)
    print(f"grid engine up in {time.monotonic() - started:.1f} s")
    yield
    for job in {line.split()[0] for line in qstat()}:
        sh("qdel", job, check=False)


@pytest.fixture
def notebook(sge: None) -> Iterator[tuple[InteractiveShell, NbdistMagics]]:
    with fresh_notebook() as shell:
        yield shell


def test_a_pool_through_grid_engine_trains_recovers_and_leaves_no_job(
        notebook: tuple[InteractiveShell, NbdistMagics]) -> None:
    ip, magics = notebook
    assert ip.run_cell("%nbdist start -n 2 --launcher sge --gpus none --partition all.q --timeout 90").success
    pool = magics.pool
    assert pool is not None
    running = qstat()
    assert len(running) == 2 and all(" r " in f" {line} " for line in running)  # one array task per engine
    assert ip.run_cell(f"%%distributed --no-dashboard\n{DDP_CELL}").result == one_process(2)
    began = time.monotonic()
    with pytest.raises(nbdist.DistributedCellError) as info:
        pool.run("import os, time\nif rank == 1:\n    os.kill(os.getpid(), 9)\ntime.sleep(60)")
    assert time.monotonic() - began < 30 and info.value.lost_state and "rank 1" in info.value.summary
    assert pool.run("world_size").value == 2  # a new job was submitted for fresh engines
    assert ip.run_cell("%nbdist stop").success
    deadline = time.monotonic() + 20
    while qstat() and time.monotonic() < deadline:
        time.sleep(0.3)
    assert qstat() == []


def test_what_goes_wrong_with_grid_engine_ends_start_within_seconds(
        notebook: tuple[InteractiveShell, NbdistMagics], capsys: pytest.CaptureFixture[str]) -> None:
    ip, _ = notebook
    capsys.readouterr()

    def refused(line: str, within: float) -> str:
        began = time.monotonic()
        assert not ip.run_cell(line).success
        assert time.monotonic() - began < within, line
        return "".join(capsys.readouterr())

    text = refused("%nbdist start -n 2 --launcher sge --gpus none --python /usr/bin/python3 --timeout 90", 30)
    assert re.search(r"job \d+ is ENDED", text) and "No module named" in text, text
    text = refused("%nbdist start -n 2 --launcher sge --gpus none --partition nowhere.q", 10)
    assert "--partition nowhere.q is not a sge queue here: choose one of all.q" in text, text
    saved = os.environ["PATH"]
    os.environ["PATH"] = "/nonexistent"
    try:
        text = refused("%nbdist start -n 2 --launcher sge --gpus none", 5)
    finally:
        os.environ["PATH"] = saved
    assert "needs qsub" in text


def test_a_deleted_job_a_pending_job_and_a_killed_kernel(notebook: tuple[InteractiveShell, NbdistMagics],
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    import subprocess as sp
    import sys

    ip, magics = notebook
    assert ip.run_cell("%nbdist start -n 2 --launcher sge --gpus none --timeout 90").success
    pool = magics.pool
    assert pool is not None
    capsys.readouterr()
    sh("qdel", qstat()[0].split()[0])
    began = time.monotonic()
    try:
        pool.run("import time\ntime.sleep(20)")
    except nbdist.DistributedCellError as error:
        # the deleted job's engines died during the cell, or while it formed the process group
        assert error.lost_state
        assert "EngineDied" in error.summary or "stopped answering the controller" in error.summary
    else:
        # or before it started (qdel is quick on a busy machine): replaced first, and said so
        said = "".join(capsys.readouterr())
        assert "since the last cell" in said and "fresh engines" in said, said
    assert time.monotonic() - began < 40
    assert pool.run("world_size").value == 2
    assert ip.run_cell("%nbdist stop").success
    # every slot taken: the pool's job waits (qw) until --timeout, then is deleted
    blocker = sh("qsub", "-t", "1-4", "-o", "/dev/null", "-j", "y", "-b", "y", "sleep", "300").stdout
    capsys.readouterr()
    began = time.monotonic()
    assert not ip.run_cell("%nbdist start -n 2 --launcher sge --gpus none --timeout 8").success
    text = "".join(capsys.readouterr())
    assert time.monotonic() - began < 40 and "is qw" in text and "cancelled" in text, text
    sh("qdel", blocker.split()[2].split(".")[0])
    deadline = time.monotonic() + 20
    while qstat() and time.monotonic() < deadline:
        time.sleep(0.3)
    assert qstat() == []
    code = ("import nbdist, time\npool = nbdist.Pool(2, launcher='sge', gpus='none', start_timeout=90)\n"
            "print('UP', flush=True)\ntime.sleep(600)")
    kernel = sp.Popen([sys.executable, "-c", code], stdout=sp.PIPE, text=True)
    assert kernel.stdout is not None and kernel.stdout.readline().startswith("UP")
    kernel.kill()
    kernel.wait()
    deadline = time.monotonic() + 30
    while qstat() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert qstat() == []
