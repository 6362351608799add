"""No orphans: however the notebook's kernel ends, the pool's processes end with it.

Real kernels (jupyter_client), real pools; the test counts processes before and after.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable

import psutil
import pytest
from _procs import wait_gone
from jupyter_client.manager import KernelManager, start_new_kernel

pytestmark = pytest.mark.integration


def _kernel_with_pool() -> tuple[KernelManager, set[int]]:
    km, kc = start_new_kernel(kernel_name="python3")
    reply = kc.execute_interactive("%load_ext nbdist\n%nbdist start -n 2", timeout=120)
    assert reply["content"]["status"] == "ok", reply["content"]
    kc.stop_channels()
    kernel_pid = km.provisioner.pid  # type: ignore[union-attr]
    pool = {p.pid for p in psutil.Process(kernel_pid).children(recursive=True)}
    assert len(pool) >= 3, "expected a controller and two engines"
    return km, pool


def _shutdown(km: KernelManager) -> None:
    km.shutdown_kernel(now=False)


def _restart(km: KernelManager) -> None:
    km.restart_kernel(now=False)


def _kill(km: KernelManager) -> None:
    os.kill(km.provisioner.pid, signal.SIGKILL)  # type: ignore[union-attr]


@pytest.mark.parametrize("end", [_shutdown, _restart, _kill], ids=["shutdown", "restart", "kill -9"])
def test_pool_ends_with_its_kernel(end: Callable[[KernelManager], None]) -> None:
    km, pool = _kernel_with_pool()
    try:
        end(km)
        left = wait_gone(pool)
        assert [psutil.Process(p).cmdline() for p in left] == []
    finally:
        if km.is_alive():
            km.shutdown_kernel(now=True)
