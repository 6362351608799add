"""What the kernel asks of an engine besides running cells: facts, pinning, joining the
group, and values to take home. Each is called through ipyparallel's `apply`."""

from __future__ import annotations

import os
import socket
from typing import Any

from nbdist._devices import scheduler_local_rank, visible_gpus
from nbdist._net import LOOPBACK, free_port, route_address
from nbdist._wire import CollectiveExport, EngineFacts, Formation, RankInfo, pack
from nbdist.backends import load_backend
from nbdist.engine._context import _CONTEXT, pin, user_namespace

__all__ = ["export", "free_port", "join", "memory", "pin", "probe"]


def probe(controller: str) -> EngineFacts:
    """Report this engine's host, reachable address, cores and GPUs (nothing is changed)."""
    address = LOOPBACK if controller == LOOPBACK else route_address(controller)
    interface = None
    if address != LOOPBACK:
        import psutil

        interface = next((name for name, addrs in psutil.net_if_addrs().items()
                          if any(a.address == address for a in addrs)), None)
    return EngineFacts(
        host=socket.gethostname(),
        pid=os.getpid(),
        address=address,
        interface=interface,
        cores=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1,
        gpus=visible_gpus(os.environ),
        scheduler_local_rank=scheduler_local_rank(os.environ),
    )


def join(info: RankInfo, formation: Formation) -> str:
    """Form the backend's process group (once) and publish the rank's names to cells."""
    backend = load_backend(formation.backend)
    backend.setup(info, formation)
    _CONTEXT.info = info
    _CONTEXT.backend = backend
    import nbdist

    user_namespace().update(
        nbdist=nbdist,
        rank=info.rank,
        local_rank=info.local_rank,
        world_size=info.world_size,
        **backend.namespace(info),
    )
    return backend.describe_device(info)


def export(name: str, collective: bool = False, wanted: bool = True) -> Any:
    """A user variable made fit for the notebook (e.g. a DDP model unwrapped, on CPU), packed
    (see `Packed`): the kernel loads it where it can, and says why where it cannot.

    A sharded model must be gathered by every rank together; asked alone (`collective`
    False) this rank says so instead of blocking, and the kernel asks all ranks."""
    ns = user_namespace()
    if name not in ns:
        raise NameError(f"name {name!r} is not defined on this engine")
    value = ns[name]
    backend = _CONTEXT.backend
    if backend is None:
        return pack(value)
    if not collective and backend.export_is_collective(value):
        return CollectiveExport()
    exported = backend.export(value)
    return pack(exported) if wanted else None


def memory() -> dict[str, float]:
    """Model-state memory on this rank, for `%nbdist status` and the dashboard."""
    backend = _CONTEXT.backend
    return backend.memory(user_namespace()) if backend is not None else {}
