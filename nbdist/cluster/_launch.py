"""Where engines run: on this machine, on hosts over SSH, through MPI or a batch scheduler,
or in a cluster someone already started.

Every way is one of ipyparallel's own launchers; this module only turns the user's options
into that launcher's settings and decides which address the controller listens on.
"""

from __future__ import annotations

import os
import shlex
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
from traitlets.config import Config

from nbdist._errors import ConfigError
from nbdist._net import LOOPBACK, route_address

LAUNCHERS = ("local", "ssh", "mpi", "slurm", "sge", "pbs")
SCHEDULERS = ("slurm", "sge", "pbs")
"""Launchers that submit a job: its nodes run the notebook's own interpreter unless --python
says otherwise (a cluster's nodes share the file system the notebook's environment is on)."""
# Launcher name -> the ipyparallel engine launcher class and the prefix of its config section.
_ENGINE_LAUNCHERS = {
    "local": ("local", "LocalEngineSetLauncher"),
    "ssh": ("ssh", "SSHEngineSetLauncher"),
    "mpi": ("mpi", "MPIEngineSetLauncher"),
    "slurm": ("slurm", "SlurmEngineSetLauncher"),
    "sge": ("sge", "SGEEngineSetLauncher"),
    "pbs": ("pbs", "PBSEngineSetLauncher"),
}


@dataclass(frozen=True)
class HostSpec:
    """One host and how many engines it runs."""

    name: str
    engines: int = 1


@dataclass(frozen=True)
class LaunchPlan:
    """How and where the engines start; fixed for the pool's life."""

    launcher: str = "local"
    hosts: tuple[HostSpec, ...] = ()
    python: str | None = None
    """The Python on the remote hosts (with nbdist and ipyparallel installed there)."""
    ssh_args: tuple[str, ...] = ()
    interface: str | None = None
    """Address or interface name the controller listens on when engines are remote."""
    partition: str | None = None
    account: str | None = None
    time: str | None = None
    mpi_args: tuple[str, ...] = ()
    connect: str | None = None
    """Profile name or connection file of an ipyparallel cluster that is already running."""

    @property
    def remote(self) -> bool:
        """Whether engines may run on other machines (so loopback addresses will not do)."""
        return self.connect is not None or self.launcher in ("ssh", *SCHEDULERS) or bool(self.hosts)

    @property
    def owns_engines(self) -> bool:
        return self.connect is None


def parse_hosts(spec: str) -> tuple[HostSpec, ...]:
    """`h1:2,h2:2` (a host without a count runs one engine; `user@h1` is kept for ssh)."""
    hosts = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        name, _, count = part.rpartition(":") if ":" in part else (part, "", "1")
        hosts.append(HostSpec(name, _engine_count(count, part)))
    if not hosts:
        raise ConfigError(f"--hosts {spec!r} names no host: use e.g. --hosts node1:2,node2:2.")
    return _no_repeats(hosts)


def read_hosts_file(path: str | os.PathLike[str]) -> tuple[HostSpec, ...]:
    """A hosts file: one host per line as `host`, `host:N`, `host N` or MPI's `host slots=N`;
    `#` starts a comment."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"--hosts-file {str(path)!r} cannot be read ({exc.strerror}).") from None
    hosts: list[HostSpec] = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        words = line.split()
        if len(words) == 1:
            hosts.extend(parse_hosts(words[0]))
        else:
            count = words[1].removeprefix("slots=")
            hosts.append(HostSpec(words[0], _engine_count(count, line)))
    if not hosts:
        raise ConfigError(f"--hosts-file {str(path)!r} names no host.")
    return _no_repeats(hosts)


def _engine_count(count: str, where: str) -> int:
    if not count.isdigit() or int(count) < 1:
        raise ConfigError(f"{where!r}: the engine count must be a whole number, at least 1 (e.g. node1:2).")
    return int(count)


def _no_repeats(hosts: list[HostSpec]) -> tuple[HostSpec, ...]:
    names = [h.name for h in hosts]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"host {', '.join(twice)} is named twice: give each host once with its engine count.")
    return tuple(hosts)


def make_plan(
    launcher: str | None = None,
    *,
    hosts: str | None = None,
    hosts_file: str | None = None,
    python: str | None = None,
    ssh_args: str | None = None,
    interface: str | None = None,
    partition: str | None = None,
    account: str | None = None,
    time: str | None = None,
    mpi_args: str | None = None,
    connect: str | None = None,
) -> LaunchPlan:
    """Check the launch options together and build the plan (the user's words in, one object out)."""
    if hosts and hosts_file:
        raise ConfigError("give --hosts or --hosts-file, not both.")
    host_specs = parse_hosts(hosts) if hosts else read_hosts_file(hosts_file) if hosts_file else ()
    chosen = launcher or ("ssh" if host_specs else "local")
    if chosen not in LAUNCHERS:
        raise ConfigError(f"--launcher {chosen!r} is not known: choose one of {', '.join(LAUNCHERS)}.")
    if connect is not None:
        if launcher or host_specs:
            raise ConfigError("--connect joins a running cluster: leave out --launcher and --hosts.")
        return LaunchPlan(connect=connect, interface=interface)
    if chosen == "ssh" and not host_specs:
        raise ConfigError("--launcher ssh needs the hosts: add --hosts node1:2,node2:2 or --hosts-file FILE.")
    if chosen in ("local", *SCHEDULERS) and host_specs:
        raise ConfigError(
            f"--hosts does not apply to --launcher {chosen}: use --launcher ssh (or mpi) to place engines on hosts."
        )
    batch_only = {"--partition": partition, "--account": account, "--time": time}
    given = [name for name, value in batch_only.items() if value]
    if given and chosen not in SCHEDULERS:
        verb = "applies" if len(given) == 1 else "apply"
        raise ConfigError(f"{', '.join(given)} {verb} to --launcher slurm, sge or pbs only.")
    slurm_only = [name for name, value in (("--account", account), ("--time", time)) if value]
    if slurm_only and chosen in ("pbs", "sge"):
        verb = "applies" if len(slurm_only) == 1 else "apply"
        section = "PBSEngineSetLauncher" if chosen == "pbs" else "SGEEngineSetLauncher"
        raise ConfigError(f"{', '.join(slurm_only)} {verb} to --launcher slurm only (set {chosen.upper()} limits in "
                          f"a batch template, {section}.batch_template).")
    if mpi_args and chosen != "mpi":
        raise ConfigError("--mpi-args applies to --launcher mpi only.")
    if python and chosen == "local":
        raise ConfigError("--python names the remote hosts' Python: it applies to --launcher ssh, mpi, slurm, sge "
                          "or pbs.")
    return LaunchPlan(
        launcher=chosen,
        hosts=host_specs,
        python=python,
        ssh_args=tuple(shlex.split(ssh_args or "")),
        interface=interface,
        partition=partition,
        account=account,
        time=time,
        mpi_args=tuple(shlex.split(mpi_args or "")),
    )


def interface_address(name: str) -> str:
    """An IPv4 address given directly, or the one of a network interface named by the user."""
    try:
        socket.inet_aton(name)
        return name
    except OSError:
        pass
    for address in psutil.net_if_addrs().get(name, []):
        if address.family == socket.AF_INET:
            return str(address.address)
    known = ", ".join(sorted(psutil.net_if_addrs()))
    raise ConfigError(f"--interface {name!r} is neither an IPv4 address nor an interface here (interfaces: {known}).")


def engine_python(plan: LaunchPlan) -> str:
    """The interpreter remote engines start with: --python, else the notebook's own for a job
    on a scheduler's nodes (whose `python3` is the system's, without nbdist), else `python3`
    (another host over SSH may well have the notebook's path to nothing)."""
    if plan.python:
        return plan.python
    return sys.executable if plan.launcher in SCHEDULERS else "python3"


def controller_address(plan: LaunchPlan) -> str:
    """Where the controller listens: loopback unless engines are elsewhere, then the named
    interface, else the address that routes to the first host, else this host's name."""
    if not plan.remote or plan.launcher == "mpi" and not plan.hosts:
        return interface_address(plan.interface) if plan.interface else LOOPBACK
    if plan.interface:
        return interface_address(plan.interface)
    if plan.hosts:
        host = plan.hosts[0].name.rpartition("@")[2]
        try:
            return route_address(socket.gethostbyname(host))
        except OSError as exc:
            raise ConfigError(f"host {host!r} cannot be resolved ({exc}): check its name.") from None
    return socket.gethostbyname(socket.gethostname())


def engine_count(plan: LaunchPlan, n: int | None) -> int | None:
    """Engines the plan starts when the hosts fix it; `-n` must then agree."""
    if not plan.hosts:
        return n
    total = sum(h.engines for h in plan.hosts)
    if n is not None and n != total:
        raise ConfigError(f"-n {n} disagrees with the hosts, which run {total} engines: leave -n out.")
    return total


def engine_launcher_config(
    plan: LaunchPlan, config: Config, engine_cmd: list[str], remote_dir: str
) -> str:
    """Fill in the engine launcher's settings; returns the launcher name for `ipp.Cluster`.

    `engine_cmd` is the command that starts one engine (the guarded ipyparallel engine);
    `remote_dir` is a profile folder of this cluster's own on the remote hosts, so a shared
    home folder never has ipyparallel copy a connection file onto itself."""
    name, section = _ENGINE_LAUNCHERS[plan.launcher]
    launcher: Any = config[section]
    launcher.engine_cmd = engine_cmd
    if plan.launcher == "local" and not plan.remote:
        # ipyparallel's nanny is a second interpreter per engine, started after registration and
        # waited for (~0.4 s of a 2-engine cold start on 2 cores); it relays signals to engines
        # elsewhere. A local engine is this process's child and is signalled directly.
        launcher.engine_args = ["--IPEngine.enable_nanny=False"]
    elif plan.launcher == "ssh":
        launcher.engines = {h.name: h.engines for h in plan.hosts}
        launcher.remote_python = plan.python or "python3"
        launcher.remote_profile_dir = remote_dir
        # Fail fast and never prompt: an unreachable host is an error, not a hang.
        launcher.ssh_args = ["-o", "BatchMode=yes", "-o", "ConnectTimeout=10", *plan.ssh_args]
        launcher.scp_args = ["-o", "BatchMode=yes", "-o", "ConnectTimeout=10", *_scp_args(plan.ssh_args)]
    elif plan.launcher == "mpi":
        args = list(plan.mpi_args)
        if plan.hosts:
            args += ["-host", ",".join(f"{h.name}:{h.engines}" for h in plan.hosts)]
        launcher.mpi_args = args
    elif plan.launcher in SCHEDULERS:
        # The job script goes to this cluster's own folder, not the notebook's working folder.
        os.makedirs(remote_dir, mode=0o700, exist_ok=True)
        launcher.batch_file_name = os.path.join(remote_dir, f"{plan.launcher}_engines.sh")
        if plan.launcher == "sge":
            # ipyparallel's SGE launcher inherits PBS's output lines, which Grid Engine ignores:
            # the engines' output (stderr too) would land in the home folder, out of sight. A
            # whole template of our own (ipyparallel then inserts nothing) says it in SGE's words.
            queue = f"#$ -q {plan.partition}\n" if plan.partition else ""
            launcher.batch_template = ("#$ -V\n#$ -S /bin/sh\n#$ -N ipengine\n#$ -t 1-{n}\n#$ -j y\n"
                                       f"#$ -o {{output_file}}\n{queue}{{program_and_args}}\n")
        if plan.partition:
            launcher.queue = plan.partition
        if plan.account:
            launcher.account = plan.account
        if plan.time:
            launcher.timelimit = plan.time
    return name


def _scp_args(ssh_args: tuple[str, ...]) -> list[str]:
    """ssh options that scp understands too (`-p PORT` is `-P PORT` there)."""
    out: list[str] = []
    it = iter(ssh_args)
    for arg in it:
        if arg == "-p":
            out += ["-P", next(it, "")]
        elif arg in ("-i", "-o", "-F"):
            out += [arg, next(it, "")]
    return out
