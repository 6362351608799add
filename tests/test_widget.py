"""The pool control panel in a real kernel: its buttons start, restart and stop a real pool,
and its table follows a killed engine on its own (the refresh task on the kernel's loop)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from jupyter_client.blocking.client import BlockingKernelClient
from jupyter_client.manager import KernelManager, start_new_kernel

pytestmark = pytest.mark.integration


@pytest.fixture
def kernel() -> Iterator[BlockingKernelClient]:
    km, kc = start_new_kernel(kernel_name="python3")
    try:
        yield kc
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=False)


def run(kc: BlockingKernelClient, code: str) -> Any:
    """Execute `code`; return the JSON its last line prints."""
    out: list[str] = []

    def hook(msg: dict[str, Any]) -> None:
        if msg["msg_type"] == "stream" and msg["content"]["name"] == "stdout":
            out.append(msg["content"]["text"])

    reply = kc.execute_interactive(code, timeout=120, output_hook=hook)
    assert reply["content"]["status"] == "ok", reply["content"]
    text = "".join(out).strip().splitlines()
    return json.loads(text[-1]) if text else None


def test_buttons_drive_a_real_pool_and_the_table_follows(kernel: BlockingKernelClient) -> None:
    run(kernel, "%load_ext nbdist\nimport json, os, nbdist\nw = nbdist.PoolWidget()\nw.engines.value = 2")
    assert "no engines" in run(kernel, "print(json.dumps(w.table.value))")
    run(kernel, "w.start_button.click()")
    state = run(kernel, "print(json.dumps([w.pool.is_running, [r['state'] for r in w.rows()], w.message.value]))")
    assert state[0] is True and state[1] == ["idle", "idle"], state
    # The panel's pool is the notebook's pool: %%distributed runs on it.
    assert run(kernel, "%%distributed --no-dashboard\nimport json\nprint(json.dumps(world_size))") == 2

    run(kernel, "os.kill(w.pool.engines[1].pid, 9)")
    time.sleep(2.5)  # the kernel is idle: only the refresh task can update the table now
    table = run(kernel, "print(json.dumps(w.table.value))")
    assert "dead (exit -9)" in table and "idle" in table

    run(kernel, "w.restart_button.click()")
    assert run(kernel, "print(json.dumps([r['state'] for r in w.rows()]))") == ["idle", "idle"]
    run(kernel, "w.stop_button.click()")
    assert run(kernel, "print(json.dumps([w.pool.is_running, w.message.value]))") == [False, "pool stopped"]


def test_panel_reports_errors_instead_of_raising(kernel: BlockingKernelClient) -> None:
    run(kernel, "import json, nbdist\nw = nbdist.PoolWidget()\nw.gpus.value = 'all'\nw.start_button.click()")
    message = run(kernel, "print(json.dumps(w.message.value))")
    assert "no GPU is visible" in message
    run(kernel, "w.stop_button.click()")
    assert "no pool is running" in run(kernel, "print(json.dumps(w.message.value))")


def test_nbdist_without_arguments_shows_the_panel(kernel: KernelManager | Any) -> None:
    shown = run(kernel, "%load_ext nbdist\nimport json\nw = %nbdist\nprint(json.dumps(type(w).__name__))")
    assert shown == "PoolWidget"
