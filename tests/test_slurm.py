"""A real Slurm cluster (Debian's slurm-wlm): munged and slurmctld on this machine, and a slurmd
in each of two network-namespace "nodes", each with its own address and host name. Pools are
started through the notebook's magics with `--launcher slurm`, so every job is a real `sbatch`.

Needs root, iproute2, slurm-wlm and munge; .ci/run installs them. Starts in about 3 s.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from _notebook import DDP_CELL, fresh_notebook, one_process
from IPython.core.interactiveshell import InteractiveShell

import nbdist
from nbdist.kernel._magics import NbdistMagics

pytestmark = pytest.mark.integration

BRIDGE, PREFIX, NET = "nbs-br", "nbs-ns", "10.78.0"
NODES = {"nbs-node1": f"{NET}.2", "nbs-node2": f"{NET}.3"}
PORTS = (6917, 6918)


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=30)


def daemon(log: Path, *cmd: str) -> subprocess.Popen[bytes]:
    """A Slurm daemon in the foreground (-D), its own session, output to a file: no pipe of ours
    is held open by a daemonized child, and a daemon that stops early says why in its log."""
    with log.open("ab") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)


def _tail(*logs: Path) -> str:
    return "\n".join(f"--- {p.name}:\n" + "\n".join(p.read_text(errors="replace").splitlines()[-15:])
                     for p in logs if p.exists())


def squeue() -> list[str]:
    return [line for line in sh("squeue", "-h", "-o", "%i %T %P %j").stdout.splitlines() if line.strip()]


def _teardown() -> None:
    for i in (1, 2):
        sh("ip", "link", "del", f"nbs-v{i}", check=False)
        sh("ip", "netns", "del", f"{PREFIX}{i}", check=False)
    sh("ip", "link", "del", BRIDGE, check=False)


CONF = """\
ClusterName=nbdisttest
SlurmctldHost={host}({net}.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool-%n
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd-%n.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd-%n.log
SlurmctldPort={ports[0]}
SlurmdPort={ports[1]}
MpiDefault=none
ReturnToService=2
MinJobAge=300
KillWait=2
NodeName=nbs-node1 NodeAddr={net}.2 CPUs=2 State=UNKNOWN
NodeName=nbs-node2 NodeAddr={net}.3 CPUs=2 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
PartitionName=small Nodes=nbs-node1 MaxTime=INFINITE State=UP
"""


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The cluster; yields its folder (logs, config). SLURM_CONF points at it meanwhile."""
    if os.geteuid() != 0 or not shutil.which("slurmctld") or not shutil.which("munged"):
        pytest.skip("needs root, slurm-wlm and munge (.ci/run installs them)")
    d = tmp_path_factory.mktemp("slurm")
    (d / "state").mkdir()
    conf = d / "slurm.conf"
    conf.write_text(CONF.format(host=os.uname().nodename, net=NET, d=d, ports=PORTS))
    # Without systemd, slurmd's cgroup/v2 plugin would ask systemd (over D-Bus) for a scope and
    # wait for it; read beside slurm.conf, this makes it build its cgroups itself.
    (d / "cgroup.conf").write_text("IgnoreSystemd=yes\nIgnoreSystemdOnFailure=yes\n")
    _teardown()
    try:
        sh("ip", "link", "add", BRIDGE, "type", "bridge")
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"network namespaces cannot be made here: {exc.stderr.strip()}")
    sh("ip", "addr", "add", f"{NET}.1/24", "dev", BRIDGE)
    sh("ip", "link", "set", BRIDGE, "up")
    for i, address in enumerate(NODES.values(), start=1):
        ns = f"{PREFIX}{i}"
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", f"nbs-v{i}", "type", "veth", "peer", "name", "eth0", "netns", ns)
        sh("ip", "link", "set", f"nbs-v{i}", "master", BRIDGE, "up")
        sh("ip", "-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
    if sh("munge", "-n", check=False).returncode != 0:
        # Not answering (a socket can outlive its munged): start one, --force past stale files.
        Path("/run/munge").mkdir(exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        sh("runuser", "-u", "munge", "--", "munged", "--force")
    saved = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(conf)
    started = time.monotonic()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs.append(daemon(d / "slurmctld.out", "slurmctld", "-D", "-i", "-f", str(conf)))
        for i, name in enumerate(NODES, start=1):
            # nsenter, not `ip netns exec`: that remounts /sys, and slurmd needs the host's cgroups
            procs.append(daemon(d / f"slurmd-{name}.out", "nsenter", f"--net=/run/netns/{PREFIX}{i}",
                                "unshare", "--uts", "sh", "-c", f"hostname {name}; exec slurmd -D -N {name} -f {conf}"))
        while sh("sinfo", "-h", "-o", "%T %D", "-p", "debug", check=False).stdout.split() != ["idle", "2"]:
            stopped = [p for p in procs if p.poll() is not None]
            if stopped or time.monotonic() - started > 60:
                # The daemons themselves cannot run here (a container's cgroups, say): that is the
                # machine, not nbdist, so say what they said rather than fail every test below.
                pytest.skip(f"Slurm's daemons did not come up here ({len(stopped)} stopped): "
                            + _tail(*sorted(d.glob("*.log")), *sorted(d.glob("*.out"))))
            time.sleep(0.2)
        print(f"slurm up in {time.monotonic() - started:.1f} s")
        yield d
    finally:
        sh("scancel", "-u", "root", check=False)
        daemons = [p for p in psutil.process_iter(["cmdline"]) if str(conf) in (p.info["cmdline"] or [])]
        for proc in daemons:
            proc.terminate()
        for proc in psutil.wait_procs(daemons, timeout=10)[1]:
            proc.kill()
        for started_proc in procs:
            started_proc.kill()
            started_proc.wait()
        if saved is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = saved
        time.sleep(0.5)
        _teardown()


@pytest.fixture
def notebook(slurm: Path) -> Iterator[tuple[InteractiveShell, NbdistMagics]]:
    with fresh_notebook() as shell:
        yield shell
    sh("scancel", "-u", "root", check=False)


START = "%nbdist start -n 4 --launcher slurm --gpus none --interface nbs-br --timeout 120"

def test_a_pool_on_two_slurm_nodes_trains_and_leaves_no_job(notebook: tuple[InteractiveShell, NbdistMagics],
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    ip, magics = notebook
    started = time.monotonic()
    assert ip.run_cell(START).success, capsys.readouterr()
    print(f"4 engines on 2 Slurm nodes in {time.monotonic() - started:.1f} s")
    pool = magics.pool
    assert pool is not None
    assert sorted({e.host for e in pool.engines}) == sorted(NODES)
    status = ip.run_cell("%nbdist status").result
    assert set(status["host"]) == set(NODES)
    jobs = squeue()
    assert len(jobs) == 1 and " RUNNING debug " in f" {jobs[0]} "
    value = ip.run_cell(f"%%distributed --no-dashboard\n{DDP_CELL}").result
    assert value == one_process(4)
    assert ip.run_cell("%nbdist stop").success
    deadline = time.monotonic() + 15
    while squeue() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert squeue() == []


def test_a_cancelled_job_or_a_dead_engine_is_reported_and_the_pool_submits_again(
        notebook: tuple[InteractiveShell, NbdistMagics]) -> None:
    ip, magics = notebook
    assert ip.run_cell(START).success
    pool = magics.pool
    assert pool is not None
    victim = pool.engines[3]
    began = time.monotonic()
    with pytest.raises(nbdist.DistributedCellError) as info:
        pool.run("import os, time\nif rank == 3:\n    os.kill(os.getpid(), 9)\ntime.sleep(60)")
    assert time.monotonic() - began < 30
    assert victim.host in info.value.summary and info.value.lost_state
    assert len(squeue()) == 1  # the pool submitted a new job for fresh engines
    assert pool.run("world_size").value == 4
    job = squeue()[0].split()[0]
    sh("scancel", job)
    began = time.monotonic()
    with pytest.raises(nbdist.DistributedCellError) as info:
        pool.run("import time\ntime.sleep(60)")
    assert time.monotonic() - began < 30, "a cancelled job must end the cell within seconds"
    assert "EngineDied" in info.value.summary and any(n in info.value.summary for n in NODES)
    assert pool.run("world_size").value == 4 and len(squeue()) == 1


def test_a_killed_kernel_leaves_no_job_and_no_process(slurm: Path) -> None:
    code = textwrap.dedent("""
        import nbdist, time
        pool = nbdist.Pool(4, launcher="slurm", gpus="none", interface="nbs-br", start_timeout=120)
        print("UP", [e.pid for e in pool.engines], flush=True)
        time.sleep(600)
    """)
    kernel = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert kernel.stdout is not None
    line = kernel.stdout.readline()
    assert line.startswith("UP"), line
    assert len(squeue()) == 1
    kernel.kill()
    kernel.wait()
    deadline = time.monotonic() + 30
    while (squeue() or _engines_left()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert squeue() == [] and _engines_left() == []


def _engines_left() -> list[int]:
    """Engines of this module's pools: they watch a controller on the nodes' bridge."""
    return [p.pid for p in psutil.process_iter(["cmdline"])
            if f"watch:{NET}.1:" in " ".join(p.info["cmdline"] or [])]


def test_job_options_and_what_goes_wrong_end_start_within_seconds(
        notebook: tuple[InteractiveShell, NbdistMagics], capsys: pytest.CaptureFixture[str]) -> None:
    ip, magics = notebook
    # --partition and --account reach the job (accounting is off here, so any account is taken)
    assert ip.run_cell("%nbdist start -n 2 --launcher slurm --gpus none --interface nbs-br --partition small "
                       "--account proj42 --time 00:10:00 --timeout 120").success
    pool = magics.pool
    assert pool is not None and {e.host for e in pool.engines} == {"nbs-node1"}
    job = squeue()[0].split()[0]
    shown = sh("scontrol", "show", "job", job).stdout
    assert "Partition=small" in shown and "Account=proj42" in shown and "TimeLimit=00:10:00" in shown
    assert ip.run_cell("%nbdist stop").success
    capsys.readouterr()

    def refused(line: str, within: float) -> str:
        began = time.monotonic()
        assert not ip.run_cell(line).success
        assert time.monotonic() - began < within, line
        return "".join(capsys.readouterr())

    # engines on the nodes with an interpreter that lacks nbdist: the job fails at once
    text = refused("%nbdist start -n 2 --launcher slurm --gpus none --interface nbs-br --python /usr/bin/python3 "
                   "--timeout 120", 20)
    assert re.search(r"job \d+ is (FAILED|COMPLETED)", text) and "No module named" in text, text
    text = refused("%nbdist start -n 2 --launcher slurm --gpus none --interface nbs-br --partition nowhere", 20)
    assert "--partition nowhere is not a slurm partition here: choose one of debug, small" in text, text
    assert "scancel" not in text
    # a job that stays pending (node1 busy): ends at --timeout, cancelled
    sh("sbatch", "-p", "small", "-n", "2", "-o", "/dev/null", "--wrap", "sleep 300")
    text = refused("%nbdist start -n 2 --launcher slurm --gpus none --interface nbs-br --partition small "
                   "--timeout 8", 40)
    assert "PENDING" in text and "cancelled" in text, text
    time.sleep(1)
    assert all(" PENDING " not in f" {j} " for j in squeue())
    sh("scancel", "-u", "root")
    # no sbatch on the PATH
    saved = os.environ["PATH"]
    os.environ["PATH"] = "/nonexistent"
    try:
        text = refused("%nbdist start -n 2 --launcher slurm --gpus none", 5)
    finally:
        os.environ["PATH"] = saved
    assert "needs sbatch" in text and "login node" in text
