"""Start an ipyparallel controller or engine that ends when the pool's owner process ends.

ipyparallel starts its processes in their own sessions, so a notebook kernel killed with
SIGKILL would leave them running. The launchers still start them (through `controller_cmd`
and `engine_cmd`); this module only puts a watcher in front of ipyparallel's own entry
point: `python -m nbdist.guard OWNER_PID ipyparallel.engine [args...]`.
"""

from __future__ import annotations

import os
import runpy
import select
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


def _exit_with_owner(owner: int) -> None:
    _wait_for_exit(owner)
    me = psutil.Process()
    for child in me.children(recursive=True):
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    os._exit(3)


def main(argv: list[str]) -> None:
    owner, module, rest = int(argv[1]), argv[2], argv[3:]
    threading.Thread(target=_exit_with_owner, args=(owner,), name="nbdist-guard", daemon=True).start()
    sys.argv = [module, *rest]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


def command(owner: int, module: str) -> list[str]:
    """The launch command for `module` guarded by `owner` (used as controller_cmd/engine_cmd)."""
    return [sys.executable, "-m", "nbdist.guard", str(owner), module]


if __name__ == "__main__":
    main(sys.argv)
