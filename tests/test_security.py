"""What a pool exposes on one machine, read from the operating system: every listening socket of
the pool's processes (kernel, controller, engines and their children) after real cells, the
connection files, and the signing key that every ipyparallel message carries."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from _procs import listeners, not_loopback, pool_processes

import nbdist

pytestmark = pytest.mark.integration


def test_nothing_listens_beyond_loopback_after_a_torch_cell(pool: nbdist.Pool) -> None:
    pool.run("import torch, torch.distributed as dist\nt = torch.ones(1)\ndist.all_reduce(t)\n"
             "model = nbdist.torch.prepare(torch.nn.Linear(2, 1))\nmodel(torch.ones(3, 2)).sum().backward()")
    found = listeners(pool_processes(pool))
    assert len(found) >= 5, found  # the controller's ports at least: the check sees real sockets
    assert not_loopback(found) == []
    # The group met through a file in a private folder: the store port the cell's variables name
    # has no listener at all.
    port = int(pool.run("import os\nint(os.environ['MASTER_PORT'])").value)
    assert port not in {p for _, _, p in found}


def test_connection_files_and_signing(pool: nbdist.Pool) -> None:
    cluster = pool._cluster
    assert cluster is not None
    security = Path(cluster.profile_dir) / "security"
    files = list(security.glob(f"ipcontroller-{cluster.cluster_id}-*.json"))
    assert len(files) == 2 and all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)
    assert not stat.S_IMODE(security.stat().st_mode) & 0o077  # the folder is its owner's only
    info = json.loads(files[0].read_text())
    assert len(info["key"]) >= 32 and info["signature_scheme"] == "hmac-sha256"


def test_a_message_with_a_wrong_signature_is_ignored(pool: nbdist.Pool) -> None:
    """A local user who can reach the controller's port but lacks the key is ignored: a
    registration signed with another key adds no engine and breaks nothing."""
    import zmq
    from jupyter_client.session import Session

    cluster = pool._cluster
    assert cluster is not None
    info = json.loads((Path(cluster.profile_dir) / "security" /
                       f"ipcontroller-{cluster.cluster_id}-engine.json").read_text())
    before = set(cluster.client.ids)
    forger = Session(key=b"not-the-key", username="intruder")
    context = zmq.Context.instance()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"{info['interface']}:{info['registration']}")
    forger.send(sock, "registration_request", content={"uuid": "forged", "id": 99})
    assert sock.poll(2000) == 0  # no reply to a forged message
    sock.close()
    assert set(cluster.client.ids) == before
    assert pool.run("rank").value == 0
