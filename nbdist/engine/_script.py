"""Running a script file on an engine as torchrun runs it: as `__main__`, with `sys.argv` set
and the torchrun variables in the environment (set when the group formed)."""

from __future__ import annotations

import os
import runpy
import socket
import sys

__all__ = ["run_script"]


class ScriptExit(Exception):
    """A script ended with `sys.exit(status)` for a status other than 0."""


def run_script(path: str, args: list[str]) -> None:
    """Run `path` with `args` as its command line. `sys.argv` and `sys.path` are put back after,
    so the engine (and the next cell) is as it was; the script's globals do not enter the
    notebook's namespace on the engine, as a script's do not enter torchrun's."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} is not a file on host {socket.gethostname()}: the script must be at the same path on every "
            "host that runs an engine (a shared file system, or copy it there)."
        )
    saved_argv, saved_path = sys.argv, list(sys.path)
    sys.argv = [path, *args]
    sys.path.insert(0, os.path.dirname(path))  # the script's own modules import as under python/torchrun
    try:
        runpy.run_path(path, run_name="__main__")
    except SystemExit as exc:
        if exc.code not in (None, 0):
            detail = exc.code if isinstance(exc.code, int) else repr(exc.code)
            raise ScriptExit(f"{os.path.basename(path)} exited with status {detail}") from None
    finally:
        sys.argv = saved_argv
        sys.path[:] = saved_path
