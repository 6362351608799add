"""Start an ipyparallel controller or engine that ends when the pool's owner process ends.

ipyparallel starts its processes in their own sessions, so a notebook kernel killed with
SIGKILL would leave them running. The launchers still start them (through `controller_cmd`
and `engine_cmd`); this module only puts a watcher in front of ipyparallel's own entry
point: `python -m nbdist.cluster._guard OWNER_PID ipyparallel.engine [args...]`.

On another host the owner's PID means nothing, so a remote engine watches the controller
instead (`watch:HOST:PORT`): the controller is guarded by the owner, and once its port
stops answering the engine ends too, even while a cell is stuck in a collective.
"""

from __future__ import annotations

import importlib
import os
import runpy
import select
import socket
import sys
import threading

import psutil


def _wait_for_exit(owner: int) -> None:
    """Block until `owner` has exited: a pidfd wakes us at once, no polling."""
    try:
        fd = os.pidfd_open(owner)
    except (AttributeError, OSError):  # already gone, or no pidfd (non-Linux)
        while psutil.pid_exists(owner):
            threading.Event().wait(1.0)
        return
    try:
        select.select([fd], [], [])
    finally:
        os.close(fd)


def _wait_for_controller(host: str, port: int, misses: int = 3, period: float = 1.0) -> None:
    """Block until the controller's port has refused (or timed out) `misses` times in a row."""
    missed = 0
    while missed < misses:
        threading.Event().wait(period)
        try:
            with socket.create_connection((host, port), timeout=period):
                missed = 0
        except OSError:
            missed += 1


def _exit_with_owner(owner: str) -> None:
    if owner.startswith("watch:"):
        host, _, port = owner.removeprefix("watch:").rpartition(":")
        _wait_for_controller(host, int(port))
    else:
        _wait_for_exit(int(owner))
    me = psutil.Process()
    for child in me.children(recursive=True):
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    pool = os.environ.get("NBDIST_POOL")
    if pool:  # also what this pool's engines started and left behind when they died before
        from nbdist.cluster._internals import end_engine_descendants

        end_engine_descendants(pool)
    os._exit(3)


def _preload(modules: list[str]) -> None:
    """Import frameworks while the engine waits to be announced (about a second of idle time),
    so the first cell does not pay for it. Importing torch does not initialise CUDA, so the
    engine can still be pinned to its GPU afterwards."""
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - the cell's own import will report a real problem
            pass


def main(argv: list[str]) -> None:
    owner, module, rest = argv[1], argv[2], argv[3:]
    preload: list[str] = []
    while rest[:1] == ["--preload"]:
        preload.append(rest[1])
        rest = rest[2:]
    threading.Thread(target=_exit_with_owner, args=(owner,), name="nbdist-guard", daemon=True).start()
    if preload:
        threading.Thread(target=_preload, args=(preload,), name="nbdist-preload", daemon=True).start()
    sys.argv = [module, *rest]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


def command(owner: int, module: str, preload: tuple[str, ...] = ()) -> list[str]:
    """The launch command for `module` guarded by `owner` (used as controller_cmd/engine_cmd)."""
    extra = [arg for name in preload for arg in ("--preload", name)]
    return [sys.executable, "-m", "nbdist.cluster._guard", str(owner), module, *extra]


def remote_command(python: str, controller: str, port: int, module: str) -> list[str]:
    """The same, for a process on another host: it ends when the controller stops answering."""
    return [python, "-m", "nbdist.cluster._guard", f"watch:{controller}:{port}", module]


if __name__ == "__main__":
    main(sys.argv)
