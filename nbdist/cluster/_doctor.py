"""`%nbdist doctor`: before anything expensive starts, check what a start with the same options
needs, and say how to fix each thing that is wrong. One row per check: ok, problem or note.

What users get wrong on clusters, and other tools let fail in silence: a host SSH cannot reach
without a prompt; a remote Python without nbdist, or with other versions of it, torch or
TensorFlow than the notebook's; a controller listening on loopback while engines are remote (or
on an address a host cannot reach); a scheduler command missing; a partition that does not
exist. Remote facts are read by one short SSH call per host, which also connects back to a
listener opened here on the controller's address.
"""

from __future__ import annotations

import json
import shlex
import socket
import subprocess
import sys
import threading
from dataclasses import asdict, dataclass
from importlib import metadata
from typing import Any

from nbdist._devices import visible_gpus
from nbdist._errors import NbdistError
from nbdist._net import LOOPBACK
from nbdist.cluster._config import resolve_options
from nbdist.cluster._jobs import missing_commands
from nbdist.cluster._launch import SCHEDULERS, LaunchPlan, controller_address, engine_python

__all__ = ["Check", "diagnose"]

PACKAGES = ("nbdist", "ipyparallel", "torch", "tensorflow")

# Run on each host with its Python: facts as one JSON line. Versions come from package metadata
# (importing torch or TensorFlow would take seconds); GPUs from NVML where it is installed.
PROBE = r"""
import json, socket, sys
from importlib import metadata
facts = {"host": socket.gethostname(), "python": sys.version.split()[0], "versions": {}, "gpus": None}
for name in %(packages)r:
    try:
        facts["versions"][name] = metadata.version(name)
    except metadata.PackageNotFoundError:
        facts["versions"][name] = None
try:
    import pynvml
    pynvml.nvmlInit()
    facts["gpus"] = pynvml.nvmlDeviceGetCount()
except Exception:
    pass
if facts["versions"].get("torch"):
    try:
        import torch
        facts["cuda"] = torch.version.cuda
        facts["nccl"] = ".".join(map(str, torch.cuda.nccl.version())) if torch.version.cuda else None
    except Exception as exc:
        facts["cuda"] = "torch does not import: %%s" %% exc
try:
    socket.create_connection((%(address)r, %(port)d), timeout=5).close()
    facts["reaches_controller"] = True
except OSError as exc:
    facts["reaches_controller"] = str(exc)
print("NBDIST-DOCTOR " + json.dumps(facts))
"""


@dataclass(frozen=True)
class Check:
    check: str
    where: str
    result: str
    """`ok`, `problem` or `note`."""
    detail: str
    fix: str = ""


def _versions_here() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


class _Listener:
    """A port open on the controller's address while the hosts try to connect to it."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket()
        self.sock.bind((address, 0))
        self.sock.listen(16)
        self.sock.settimeout(0.5)
        self.port = self.sock.getsockname()[1]
        self._open = True
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while self._open:
            try:
                self.sock.accept()[0].close()
            except OSError:
                continue

    def close(self) -> None:
        self._open = False
        self.sock.close()

    def __enter__(self) -> _Listener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _local_facts() -> dict[str, Any]:
    """The probe's facts for this machine, read in a child process: the kernel never imports torch."""
    with _Listener(LOOPBACK) as listener:
        done = subprocess.run([sys.executable, "-c", PROBE % {"packages": PACKAGES, "address": LOOPBACK,
                                                              "port": listener.port}],
                              capture_output=True, text=True, timeout=60)
    line = next((x for x in done.stdout.splitlines() if x.startswith("NBDIST-DOCTOR ")), "NBDIST-DOCTOR {}")
    facts: dict[str, Any] = json.loads(line.removeprefix("NBDIST-DOCTOR "))
    return facts


def _ssh(plan: LaunchPlan, host: str, python: str, code: str) -> tuple[int, str]:
    args = ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=5", *plan.ssh_args, host,
            f"{shlex.quote(python)} -c {shlex.quote(code)}"]
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return 255, "no answer within 30 s"
    return done.returncode, (done.stdout + done.stderr).strip()


def _host_checks(plan: LaunchPlan, host: str, address: str, port: int, here: dict[str, str | None]) -> list[Check]:
    python = engine_python(plan)
    code, out = _ssh(plan, host, python, PROBE % {"packages": PACKAGES, "address": address, "port": port})
    if code == 255:
        return [Check("ssh", host, "problem", out.splitlines()[-1] if out else "ssh failed",
                      f"make `ssh {host}` work without a password prompt (a key in ~/.ssh/authorized_keys there), "
                      "and check the host name")]
    line = next((x for x in out.splitlines() if x.startswith("NBDIST-DOCTOR ")), None)
    if line is None:
        return [Check("ssh", host, "ok", "reachable without a prompt"),
                Check("python", host, "problem", f"{python}: {out.splitlines()[-1] if out else 'no output'}",
                      "install Python 3 there, or name it with --python")]
    facts = json.loads(line.removeprefix("NBDIST-DOCTOR "))
    rows = [Check("ssh", host, "ok", f"reachable without a prompt (host name {facts['host']})"),
            Check("python", host, "ok", f"{python}: Python {facts['python']}")]
    there = facts["versions"]
    for name in PACKAGES:
        mine, theirs = here.get(name), there.get(name)
        if name in ("nbdist", "ipyparallel") and theirs is None:
            rows.append(Check(name, host, "problem", f"not installed for {python}",
                              f"pip install nbdist there (same version as here, {mine}), or point --python at the "
                              "environment that has it"))
        elif mine != theirs and (mine or theirs):
            rows.append(Check(name, host, "problem", f"{theirs or 'not installed'} there, {mine or 'not installed'} "
                              "here", f"install {name}=={mine} there too" if mine else f"{name} is not needed there"))
        elif mine:
            rows.append(Check(name, host, "ok", f"{theirs}, as here"))
    reach = facts.get("reaches_controller")
    rows.append(Check("controller reachable", host, "ok" if reach is True else "problem",
                      f"{address}:{port} from {host}" + ("" if reach is True else f": {reach}"),
                      "" if reach is True else "give --interface the interface (or address) of this machine that "
                      f"{host} can reach"))
    gpus = facts.get("gpus")
    rows.append(Check("GPUs", host, "note", f"{gpus} visible to NVML" if gpus is not None else "no NVML (CPU engines)"))
    rows += _cuda_rows(facts, host)
    return rows


def _cuda_rows(facts: dict[str, Any], where: str) -> list[Check]:
    if "cuda" not in facts:
        return []
    cuda, nccl = facts["cuda"], facts.get("nccl")
    if isinstance(cuda, str) and cuda.startswith("torch does not import"):
        return [Check("CUDA / NCCL", where, "problem", cuda, "reinstall torch in that environment")]
    text = f"torch built for CUDA {cuda}, NCCL {nccl}" if cuda else "torch is a CPU build (gloo only)"
    gpus = facts.get("gpus")
    if not cuda and gpus:
        return [Check("CUDA / NCCL", where, "problem", f"{text}, but {gpus} GPUs are there",
                      "install a CUDA build of torch to use them (see the README's CPU or GPU torch)")]
    return [Check("CUDA / NCCL", where, "note", text)]


def _scheduler_checks(plan: LaunchPlan) -> list[Check]:
    missing = missing_commands(plan.launcher)
    if missing:
        return [Check("scheduler", "here", "problem", f"{', '.join(missing)} not on the PATH",
                      "run the notebook on the cluster's login node, or choose another --launcher")]
    rows = [Check("scheduler", "here", "ok", f"{plan.launcher}'s commands are on the PATH")]
    if plan.partition:
        ask = {"slurm": ["sinfo", "-h", "-o", "%P", "-p", plan.partition], "sge": ["qconf", "-sq", plan.partition],
               "pbs": ["qstat", "-Q", plan.partition]}[plan.launcher]
        done = subprocess.run(ask, capture_output=True, text=True, timeout=20)
        known = done.returncode == 0 and bool(done.stdout.strip())
        rows.append(Check("partition", "here", "ok" if known else "problem",
                          f"{plan.partition} {'exists' if known else 'is not known to the scheduler'}",
                          "" if known else "list the partitions (sinfo / qconf -sql / qstat -Q) and pick one"))
    if plan.account and plan.launcher == "slurm":
        rows.append(Check("account", "here", "note", f"{plan.account}: checked by Slurm only where accounting "
                          "enforces associations (AccountingStorageEnforce); a wrong one fails the submission"))
    return rows


def diagnose(n: int | None = None, **options: Any) -> list[Check]:
    """Check a start with these options (`Pool`'s, `%nbdist start`'s); nothing is started."""
    try:
        cfg = resolve_options(n, **options)
    except NbdistError as exc:
        return [Check("options", "here", "problem", str(exc), "change the option the message names")]
    plan = cfg.launch
    rows = [Check("options", "here", "ok", f"{cfg.n} engines, launcher {plan.launcher}, "
                  f"{'GPUs ' + ','.join(g or '' for g in cfg.gpus) if any(cfg.gpus) else 'CPU'}")]
    here = _versions_here()
    rows.append(Check("python", "here", "ok", f"{sys.executable}: Python {sys.version.split()[0]}; "
                      + ", ".join(f"{k} {v}" for k, v in here.items() if v)))
    gpus = visible_gpus({})
    rows.append(Check("GPUs", "here", "note", f"{len(gpus)} visible to NVML" if gpus else "none (CPU engines)"))
    rows += _cuda_rows(_local_facts(), "here")
    if plan.connect:
        return rows
    try:
        address = controller_address(plan)
    except NbdistError as exc:
        return [*rows, Check("controller address", "here", "problem", str(exc), "give --interface IF or an address")]
    if plan.remote and address == LOOPBACK:
        rows.append(Check("controller address", "here", "problem", f"{address}: remote engines cannot reach loopback",
                          "give --interface the interface the other hosts reach this machine on"))
    else:
        rows.append(Check("controller address", "here", "ok", f"the controller will listen on {address}"))
    try:
        listener = _Listener(address)
    except OSError as exc:
        return [*rows, Check("free ports", "here", "problem", f"cannot listen on {address}: {exc}",
                             "give --interface an address of this machine")]
    rows.append(Check("free ports", "here", "ok", f"can listen on {address} (e.g. port {listener.port})"))
    try:
        for host in dict.fromkeys(h.name for h in plan.hosts):
            rows += _host_checks(plan, host, address, listener.port, here)
    finally:
        listener.close()
    if plan.launcher in SCHEDULERS:
        rows += _scheduler_checks(plan)
    return rows


def as_rows(checks: list[Check]) -> list[dict[str, str]]:
    return [asdict(c) for c in checks]
