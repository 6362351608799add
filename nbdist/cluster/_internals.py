"""What nbdist reads and sets inside ipyparallel's own objects (launchers, their processes,
connection files, the client's settings): kept here, so an ipyparallel upgrade that moves
them is mended in one file."""

from __future__ import annotations

import json
import os
import time
from typing import Any

import ipyparallel as ipp
import psutil

from nbdist._net import LOOPBACK
from nbdist.cluster._config import PoolConfig


def owner_only(cluster: ipp.Cluster) -> None:
    """Connection files hold the key that signs every message: readable by their owner only."""
    folder = os.path.join(cluster.profile_dir, "security")
    for name in os.listdir(folder):
        if cluster.cluster_id in name:
            os.chmod(os.path.join(folder, name), 0o600)


def registration_port(cluster: ipp.Cluster) -> int:
    path = os.path.join(cluster.profile_dir, "security", f"ipcontroller-{cluster.cluster_id}-engine.json")
    deadline = time.monotonic() + 10
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.05)
    with open(path) as handle:
        return int(json.load(handle)["registration"])


def client_controller_ip(client: ipp.Client) -> str:
    url = str(client._config.get("interface") or client._config.get("url") or "")
    host = url.split("://")[-1].rsplit(":", 1)[0]
    return host if host and host not in ("*", "0.0.0.0", "localhost") else LOOPBACK


def launch_failure(cfg: PoolConfig, cluster: ipp.Cluster, exc: Exception) -> str:
    """Name the host that could not be reached (ipyparallel's error names only the command)."""
    plan = cfg.launch
    if plan.launcher == "ssh":
        # The SSH launcher registers each host's launcher ("host/i") just before starting it,
        # so the last one registered is the host that failed.
        keys = [key for eset in cluster.engines.values() for key in getattr(eset, "launchers", {})]
        failed = keys[-1].rsplit("/", 1)[0] if keys else plan.hosts[0].name
        detail = getattr(exc, "output", None) or getattr(exc, "stderr", None) or exc
        if isinstance(detail, bytes):
            detail = detail.decode(errors="replace")
        return (
            f"could not start engines on host {failed} over SSH: {str(detail).strip()[-500:]}. "
            f"Check that `ssh {failed}` works without a password prompt and that {plan.python or 'python3'} "
            "there has nbdist and ipyparallel installed (--python names it). Nothing was left running."
        )
    return f"the {plan.launcher} launcher could not start the engines: {exc}"


POOL_VARIABLE = "NBDIST_POOL"
"""Set in each engine's environment: every process an engine starts (a DataLoader worker, a
fork inside a cell, Lightning's own launcher) inherits it, even once its engine has died and
it was handed to init, so the pool can find and end it."""


def end_engine_descendants(pool_id: str) -> None:
    """Kill every process on this host that an engine of the pool `pool_id` started (the
    engines themselves are stopped by ipyparallel first). Processes of other users, and ones
    whose environment cannot be read, are left alone."""
    me = os.getpid()
    for process in psutil.process_iter(["pid"]):
        if process.pid == me:
            continue
        try:
            if process.environ().get(POOL_VARIABLE) == pool_id:
                process.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
            pass


def forget_unsubmitted(cluster: ipp.Cluster) -> None:
    """A batch engine set whose submission failed has no job id: stopping it would run
    `scancel ''` and report that failure on top of the real one."""
    for key, engine_set in list(cluster.engines.items()):
        if hasattr(engine_set, "job_id") and not engine_set.job_id:
            del cluster.engines[key]


def reap_stragglers(cluster: ipp.Cluster) -> None:
    """Kill any engine or controller process a failed stop left behind (tracked PIDs only)."""
    handles: list[Any] = []
    for engine_set in list(cluster.engines.values()):
        handles.extend(getattr(engine_set, "launchers", {}).values())
    if cluster.controller is not None:
        handles.append(cluster.controller)
    for launcher in handles:
        process = getattr(launcher, "process", None)
        if isinstance(process, psutil.Process) and process.is_running():
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
