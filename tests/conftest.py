"""Shared fixtures: one real 2-engine pool (gloo on CPU) for the integration tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from _kernel import execute
from IPython.core.interactiveshell import InteractiveShell
from jupyter_client.blocking.client import BlockingKernelClient
from jupyter_client.manager import start_new_kernel

import nbdist
from nbdist.kernel._magics import NbdistMagics


@pytest.fixture(scope="session")
def pool() -> Iterator[nbdist.Pool]:
    with nbdist.Pool(n=2, gpus="none") as p:  # CPU engines on gloo, also on a GPU machine
        yield p


@pytest.fixture(scope="session")
def shell() -> InteractiveShell:
    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "nbdist")
    return ip


@pytest.fixture
def magics(shell: InteractiveShell, pool: nbdist.Pool) -> Iterator[NbdistMagics]:
    """The shell's magics, attached to the shared pool (so tests do not pay a start each)."""
    m = shell.magics_manager.registry["NbdistMagics"]
    assert isinstance(m, NbdistMagics)
    m.pool = pool
    yield m
    m.pool = None


@pytest.fixture(scope="module")
def kc() -> Iterator[BlockingKernelClient]:
    """A real kernel per test module, with nbdist loaded and a 2-engine CPU pool started."""
    km, client = start_new_kernel(kernel_name="python3")
    try:
        assert execute(client, "%load_ext nbdist\n%nbdist start -n 2 --gpus none").ok
        yield client
    finally:
        execute(client, "%nbdist stop")
        client.stop_channels()
        km.shutdown_kernel(now=False)
