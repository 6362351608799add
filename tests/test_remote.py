"""Engines on other hosts, for real: two network namespaces on this machine, each with its own
address, host name and sshd; engines reach them through ipyparallel's SSH launcher. MPI runs
through Debian's Open MPI. Slurm and PBS are checked through the job scripts ipyparallel writes.

Needs root, iproute2, openssh-server (and openmpi-bin + mpi4py for MPI); .ci/run installs them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import ipyparallel as ipp
import psutil
import pytest
from _notebook import fresh_notebook
from _procs import alive
from IPython.core.interactiveshell import InteractiveShell
from traitlets.config import Config

import nbdist
from nbdist import ConfigError, PoolStartError
from nbdist.cluster import resolve_config
from nbdist.cluster._launch import engine_launcher_config, make_plan
from nbdist.kernel._magics import NbdistMagics

BRIDGE, PREFIX, NET = "nbd-br", "nbd-h", "10.77.0"
HOSTS = (f"{NET}.2", f"{NET}.3")
PYTHON = sys.executable


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def two_hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Two "hosts" (netns + veth on a bridge + sshd in its own UTS namespace); yields the
    ssh options that reach them with a key made here."""
    if os.geteuid() != 0 or not shutil.which("sshd") and not Path("/usr/sbin/sshd").exists():
        pytest.skip("needs root and openssh-server (.ci/run installs it)")
    d = tmp_path_factory.mktemp("hosts")
    _teardown()
    try:
        sh("ip", "link", "add", BRIDGE, "type", "bridge")
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"network namespaces cannot be made here: {exc.stderr.decode().strip()}")
    sh("ip", "addr", "add", f"{NET}.1/24", "dev", BRIDGE)
    sh("ip", "link", "set", BRIDGE, "up")
    sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "key"))
    sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "hostkey"))
    shutil.copy(d / "key.pub", d / "authorized_keys")
    Path("/run/sshd").mkdir(exist_ok=True)
    for i, address in enumerate(HOSTS, start=1):
        ns = f"{PREFIX}{i}"
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", f"nbd-v{i}", "type", "veth", "peer", "name", "eth0", "netns", ns)
        sh("ip", "link", "set", f"nbd-v{i}", "master", BRIDGE, "up")
        sh("ip", "-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        sshd = (f"/usr/sbin/sshd -f /dev/null -h {d}/hostkey -o ListenAddress={address} "
                f"-o AuthorizedKeysFile={d}/authorized_keys -o PermitRootLogin=prohibit-password "
                f"-o StrictModes=no -o UsePAM=no -o PidFile={d}/sshd{i}.pid -o 'Subsystem=sftp internal-sftp'")
        sh("ip", "netns", "exec", ns, "unshare", "--uts", "sh", "-c", f"hostname nbd-host{i}; exec {sshd}")
    ssh_args = f"-i {d}/key -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR"
    try:
        for address in HOSTS:
            _wait_for_port(address, 22)
        yield ssh_args
    finally:
        for i in (1, 2):
            pid_file = d / f"sshd{i}.pid"
            if pid_file.exists():
                os.kill(int(pid_file.read_text()), signal.SIGTERM)
        _teardown()


def _teardown() -> None:
    for cmd in (["ip", "link", "del", "nbd-v1"], ["ip", "link", "del", "nbd-v2"],
                ["ip", "netns", "del", f"{PREFIX}1"], ["ip", "netns", "del", f"{PREFIX}2"],
                ["ip", "link", "del", BRIDGE]):
        subprocess.run(cmd, capture_output=True, timeout=30)


def _wait_for_port(host: str, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise


@pytest.fixture
def fresh_shell() -> Iterator[tuple[InteractiveShell, NbdistMagics]]:
    with fresh_notebook() as shell:
        yield shell


DDP = textwrap.dedent("""
    import torch
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel as DDP
    torch.manual_seed(0)
    model = DDP(nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    X, Y = torch.randn(64, 4, generator=g), torch.randn(64, 1, generator=g)
    for step in range(20):
        x, y = X[rank::world_size], Y[rank::world_size]
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    import os
    params = torch.cat([p.detach().flatten() for p in model.parameters()])
    master = os.environ["MASTER_ADDR"]
""")


def _reference() -> list[float]:
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    X, Y = torch.randn(64, 4, generator=g), torch.randn(64, 1, generator=g)
    order = torch.cat([torch.arange(0, 64, 2), torch.arange(1, 64, 2)])  # the two ranks' shards together
    for _ in range(20):
        opt.zero_grad()
        nn.functional.mse_loss(model(X[order]), Y[order]).backward()
        opt.step()
    return torch.cat([p.detach().flatten() for p in model.parameters()]).tolist()


def test_ddp_across_two_hosts_over_ssh(two_hosts: str, fresh_shell: tuple[InteractiveShell, NbdistMagics],
                                       capsys: pytest.CaptureFixture[str]) -> None:
    ip, magics = fresh_shell
    ip.user_ns["SSH"] = two_hosts
    result = ip.run_cell(f"%nbdist start --hosts {HOSTS[0]}:1,{HOSTS[1]}:1 --python {PYTHON} "
                         f"--ssh-args \"$SSH\" --timeout 60")
    assert result.success, result.error_in_exec
    assert "2 engines ready on 2 hosts (nbd-host1: 1, nbd-host2: 1)" in capsys.readouterr().out
    pool = magics.pool
    assert pool is not None
    cluster_id = pool._cluster.cluster_id  # type: ignore[union-attr]
    pids = [e.pid for e in pool.engines]
    assert len(alive(pids, "ipyparallel.engine")) == 2

    status = ip.run_cell("%nbdist status").result
    assert list(status.host) == ["nbd-host1", "nbd-host2"]
    assert [e.address for e in pool.engines] == list(HOSTS)

    assert ip.run_cell("%%distributed\n" + DDP).success
    assert ip.run_cell("%nbdist pull params --rank 0").success
    p0 = ip.user_ns["params"].tolist()
    assert ip.run_cell("%nbdist pull params --rank 1").success
    assert ip.user_ns["params"].tolist() == p0  # identical on both hosts
    assert p0 == pytest.approx(_reference(), abs=1e-6)  # and equal to one process on the whole batch
    assert ip.run_cell("%nbdist pull master").success
    assert ip.user_ns["master"] == HOSTS[0]  # rank 0's host address, not loopback

    # Security: the controller listens on the bridge only, connection files are the owner's,
    # and messages are signed.
    security = Path(pool._cluster.profile_dir) / "security"  # type: ignore[union-attr]
    files = list(security.glob(f"ipcontroller-{cluster_id}-*.json"))
    assert files and all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)
    info = json.loads((security / f"ipcontroller-{cluster_id}-engine.json").read_text())
    assert info["key"] and info["interface"] == f"tcp://{NET}.1"

    # A host lost mid-training: its engine is killed while the ranks all-reduce in a loop.
    killer = subprocess.Popen(["sh", "-c", f"sleep 3; kill -9 {pids[1]}"])
    started = time.monotonic()
    result = ip.run_cell("%%distributed\nimport torch.distributed as dist\n"
                         "for _ in range(100000):\n    dist.all_reduce(torch.ones(1))")
    killer.wait()
    assert not result.success and time.monotonic() - started < 60
    assert "rank 1" in str(result.error_in_exec)
    assert "recovered" in str(result.error_in_exec)
    assert [e.host for e in pool.engines] == ["nbd-host1", "nbd-host2"]  # fresh engines, same hosts
    pids += [e.pid for e in pool.engines]
    assert ip.run_cell("%%distributed\nimport torch, torch.distributed as dist\n"
                       "t = torch.ones(1); dist.all_reduce(t); ok = t.item()").success
    assert ip.run_cell("%nbdist pull ok --rank 1").success and ip.user_ns["ok"] == 2.0

    assert ip.run_cell("%nbdist stop").success
    deadline = time.monotonic() + 20
    while alive(pids, "ipyparallel.engine") and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not alive(pids, "ipyparallel.engine")


def test_tensorflow_workers_across_two_hosts(two_hosts: str) -> None:
    pytest.importorskip("tensorflow")
    plan = make_plan(hosts=f"{HOSTS[0]}:1,{HOSTS[1]}:1", python=PYTHON, ssh_args=two_hosts)
    with nbdist.Pool(config=resolve_config(start_timeout=60, launch=plan)) as pool:
        pool.run(
            "import json, os\nimport tensorflow as tf\n"
            "value = strategy.run(lambda: tf.constant(float(rank + 1)))\n"
            "total = float(strategy.reduce(tf.distribute.ReduceOp.SUM, value, axis=None))\n"
            "workers = json.loads(os.environ['TF_CONFIG'])['cluster']['worker']",
            backend="tensorflow",
        )
        for rank in (0, 1):
            assert pool.pull("total", rank=rank) == 3.0  # a real collective between the two hosts
        workers = pool.pull("workers")
        assert [w.rsplit(":", 1)[0] for w in workers] == list(HOSTS)  # addresses the other host reaches


def test_unreachable_host_is_named_and_nothing_is_left(two_hosts: str) -> None:
    plan = make_plan(hosts=f"{HOSTS[0]}:1,{NET}.9:1", python=PYTHON, ssh_args=two_hosts)
    pool = nbdist.Pool(config=resolve_config(start_timeout=30, launch=plan))
    started = time.monotonic()
    with pytest.raises(PoolStartError, match=rf"host {NET}\.9 over SSH"):
        pool.start()
    assert time.monotonic() - started < 30
    assert not pool.is_running
    time.sleep(5)  # the engine started on the reachable host ends with its controller
    assert not [p for p in psutil.process_iter(["cmdline"]) if "ipyparallel.engine" in " ".join(
        p.info["cmdline"] or []) and "watch:" in " ".join(p.info["cmdline"] or [])]


def test_doctor_finds_an_unreachable_host_a_wrong_python_and_a_loopback_controller(
        two_hosts: str, fresh_shell: tuple[InteractiveShell, NbdistMagics], capsys: pytest.CaptureFixture[str]) -> None:
    ip, _ = fresh_shell
    began = time.monotonic()
    table = ip.run_cell(f'%nbdist doctor --hosts {HOSTS[0]}:1,{NET}.9:1 --python {PYTHON} '
                        f'--ssh-args "{two_hosts}"').result
    assert time.monotonic() - began < 30
    rows = {(r.check, r.where): r for r in table.itertuples()}
    assert rows[("ssh", HOSTS[0])].result == "ok" and "nbd-host1" in rows[("ssh", HOSTS[0])].detail
    assert rows[("nbdist", HOSTS[0])].result == "ok"
    assert rows[("controller reachable", HOSTS[0])].result == "ok"
    assert "CPU build" in rows[("CUDA / NCCL", HOSTS[0])].detail
    unreachable = rows[("ssh", f"{NET}.9")]
    assert unreachable.result == "problem" and "password prompt" in unreachable.fix
    assert "1 problem found" in capsys.readouterr().out
    wrong = ip.run_cell(f'%nbdist doctor --hosts {HOSTS[1]}:2 --python /usr/bin/python3 '
                        f'--ssh-args "{two_hosts}"').result
    rows = {(r.check, r.where): r for r in wrong.itertuples()}
    assert rows[("nbdist", HOSTS[1])].result == "problem" and "--python" in rows[("nbdist", HOSTS[1])].fix
    loopback = ip.run_cell(f'%nbdist doctor --hosts {HOSTS[1]}:2 --interface lo --python {PYTHON} '
                           f'--ssh-args "{two_hosts}"').result
    rows = {(r.check, r.where): r for r in loopback.itertuples()}
    assert rows[("controller address", "here")].result == "problem"
    assert rows[("controller reachable", HOSTS[1])].result == "problem" and "--interface" in \
        rows[("controller reachable", HOSTS[1])].fix


def test_remote_engines_end_when_the_kernel_is_killed(two_hosts: str, tmp_path: Path) -> None:
    script = tmp_path / "kernel.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time, nbdist
        from nbdist.cluster import resolve_config
        from nbdist.cluster import make_plan
        plan = make_plan(hosts="{HOSTS[0]}:1,{HOSTS[1]}:1", python={PYTHON!r}, ssh_args={two_hosts!r})
        pool = nbdist.Pool(config=resolve_config(start_timeout=60, launch=plan)).start()
        print(*[e.pid for e in pool.engines], flush=True)
        time.sleep(600)
    """))
    kernel = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert kernel.stdout is not None
        pids = [int(p) for p in kernel.stdout.readline().split()]
        assert len(alive(pids, "ipyparallel.engine")) == 2
        kernel.kill()
        kernel.wait()
        deadline = time.monotonic() + 30
        while alive(pids, "ipyparallel.engine") and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not alive(pids, "ipyparallel.engine"), "remote engines outlived the kernel"
    finally:
        kernel.kill()


@pytest.mark.skipif(shutil.which("mpiexec") is None, reason="needs Open MPI (.ci/run installs openmpi-bin)")
def test_mpi_launcher_runs_engines_for_real() -> None:
    pytest.importorskip("mpi4py")
    plan = make_plan("mpi", mpi_args="--allow-run-as-root --oversubscribe")
    with nbdist.Pool(config=resolve_config(2, launch=plan)) as pool:
        pool.run(
            "import os, torch, torch.distributed as dist\n"
            "t = torch.tensor([rank + 1.0]); dist.all_reduce(t)\n"
            "seen = (t.item(), int(os.environ['OMPI_COMM_WORLD_LOCAL_RANK']), local_rank)"
        )
        # mpiexec's local rank fixes the order: rank r is MPI local rank r on this one host
        assert [pool.pull("seen", rank=r) for r in (0, 1)] == [(3.0, 0, 0), (3.0, 1, 1)]


def _script(launcher: str, **options: str) -> str:
    """The batch script ipyparallel's launcher writes with the settings nbdist gives it."""
    from ipyparallel.cluster.launcher import find_launcher_class

    config = Config()
    name = engine_launcher_config(make_plan(launcher, **options), config,
                                  ["/opt/py/bin/python", "-m", "nbdist.cluster._guard", "watch:10.1.2.3:4567",
                                   "ipyparallel.engine"], "/tmp/x")
    cls = find_launcher_class(name, "engine")
    profile = Path(os.environ.get("TMPDIR", "/tmp")) / f"nbdist-script-{os.getpid()}"
    (profile / "log").mkdir(parents=True, exist_ok=True)
    launcher_obj = cls(config=config, profile_dir=str(profile), cluster_id="c1", work_dir=str(profile))
    launcher_obj.write_batch_script(4)
    return Path(launcher_obj.batch_file).read_text()


def test_slurm_job_script_carries_the_options() -> None:
    text = _script("slurm", partition="gpu", account="proj42", time="01:30:00")
    for line in ("#SBATCH --partition=gpu", "#SBATCH --account=proj42", "#SBATCH --time=01:30:00",
                 "#SBATCH --ntasks=4"):
        assert line in text, text
    assert "nbdist.cluster._guard watch:10.1.2.3:4567 ipyparallel.engine" in text


def test_sge_job_script_carries_the_queue() -> None:
    text = _script("sge", partition="all.q")
    assert "#$ -q all.q" in text and "#$ -j y" in text and "#$ -t 1-4" in text and "nbdist.cluster._guard" in text


def test_scheduler_engines_start_with_the_notebooks_python_unless_told() -> None:
    from nbdist.cluster._launch import engine_python

    assert engine_python(make_plan("slurm")) == sys.executable
    assert engine_python(make_plan("sge", python="/opt/env/bin/python")) == "/opt/env/bin/python"
    assert engine_python(make_plan(hosts="h1:1")) == "python3"


def test_pbs_job_script_carries_the_queue() -> None:
    text = _script("pbs", partition="short")
    assert "#PBS -q short" in text and "#PBS -t 1-4" in text, text
    assert "nbdist.cluster._guard watch:10.1.2.3:4567 ipyparallel.engine" in text


def test_mpi_command_line_places_engines_on_hosts() -> None:
    config = Config()
    engine_launcher_config(make_plan("mpi", hosts="a:2,b:2", mpi_args="--bind-to none"), config,
                           ["python", "-m", "ipyparallel.engine"], "/tmp/x")
    assert config.MPIEngineSetLauncher.mpi_args == ["--bind-to", "none", "-host", "a:2,b:2"]


def test_connect_joins_a_running_cluster_without_owning_it() -> None:
    cluster = ipp.Cluster(n=2, controller_ip="127.0.0.1", log_level=40)
    cluster.start_cluster_sync()
    try:
        client = cluster.connect_client_sync()
        client.wait_for_engines(2, timeout=60)
        path = Path(cluster.profile_dir) / "security" / f"ipcontroller-{cluster.cluster_id}-client.json"
        pool = nbdist.Pool(config=resolve_config(launch=make_plan(connect=str(path)))).start()
        try:
            assert len(pool.engines) == 2
            result = pool.run("import torch, torch.distributed as dist\n"
                              "t = torch.tensor([1.0]); dist.all_reduce(t); t.item()")
            assert result.value == 2.0
            with pytest.raises(nbdist.PoolStateError, match="did not start"):
                pool.restart()
        finally:
            pool.stop()
        assert len(client.ids) == 2  # the cluster's engines are still there
        client.close()
    finally:
        cluster.stop_cluster_sync()


def test_ranks_are_placed_host_by_host() -> None:
    from nbdist._wire import EngineFacts
    from nbdist.cluster._placement import place

    facts = [
        EngineFacts("b", 1, "10.0.0.3", "eth0", 8, ("0", "1"), 1),
        EngineFacts("a", 2, "10.0.0.2", "eth0", 4, (), None),
        EngineFacts("b", 3, "10.0.0.3", "eth0", 8, ("0", "1"), 0),
        EngineFacts("a", 4, "10.0.0.2", "eth0", 4, (), None),
    ]
    placed = place(facts)
    # host a (registration order), then host b by the scheduler's local rank
    assert [(p.index, p.rank, p.local_rank, p.gpu, p.threads) for p in placed] == [
        (1, 0, 0, None, 2), (3, 1, 1, None, 2), (2, 2, 0, "0", 4), (0, 3, 1, "1", 4)]
    assert all(p.gpu is None for p in place(facts, use_gpus=False))
    with pytest.raises(ConfigError, match="shows 1 GPUs for 2 engines"):
        place([EngineFacts("c", 1, gpus=("0",)), EngineFacts("c", 2, gpus=("0",))])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"hosts": "a:2", "hosts_file": "f"}, "not both"),
        ({"hosts": "a:0"}, "at least 1"),
        ({"hosts": "a:2,a:1"}, "named twice"),
        ({"launcher": "ssh"}, "needs the hosts"),
        ({"launcher": "slurm", "hosts": "a:2"}, "does not apply"),
        ({"launcher": "mpi", "partition": "p"}, "slurm, sge or pbs only"),
        ({"launcher": "pbs", "time": "1:00:00"}, "slurm only"),
        ({"launcher": "local", "mpi_args": "-x"}, "mpi only"),
        ({"launcher": "k8s"}, "not known"),
        ({"connect": "prof", "hosts": "a:1"}, "leave out"),
        ({"hosts_file": "/nonexistent/hosts"}, "cannot be read"),
    ],
)
def test_launch_options_are_checked(options: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make_plan(**options)


def test_hosts_file_formats(tmp_path: Path) -> None:
    f = tmp_path / "hosts"
    f.write_text("# nodes\nnode1:2\nnode2 slots=4\nnode3 1  # one\nuser@node4\n")
    plan = make_plan(hosts_file=str(f))
    assert plan.launcher == "ssh"
    assert [(h.name, h.engines) for h in plan.hosts] == [("node1", 2), ("node2", 4), ("node3", 1), ("user@node4", 1)]
    assert resolve_config(launch=plan).n == 8
    with pytest.raises(ConfigError, match="disagrees"):
        resolve_config(3, launch=plan)
    with pytest.raises(ConfigError, match="names GPUs of this machine"):
        resolve_config(gpus="0,1", launch=plan, environ={"CUDA_VISIBLE_DEVICES": "0,1"})
