"""Install the peers from PyPI into `benchmarks/.peers` (their own folder, put on PYTHONPATH
only for the peer subprocesses), without touching torch or the project's environment."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
TARGET = HERE / ".peers"
PEERS = {"nbdistributed": "0.1.0", "accelerate": "1.15.0", "torchmonarch": "0.7.0"}
# Their dependencies that the project's environment lacks (torch, pyzmq, IPython are there):
# Accelerate's, then those torchmonarch's actors import.
EXTRA = ["huggingface_hub", "safetensors", "hf-xet",
         "opentelemetry-api", "pyre-extensions", "typing-inspect", "mypy-extensions", "tabulate"]


def ensure() -> dict[str, str]:
    """Install once; return {peer: version}."""
    marker = TARGET / ".installed"
    wanted = " ".join(f"{k}=={v}" for k, v in PEERS.items())
    if not marker.exists() or marker.read_text() != wanted:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--upgrade", "--target",
                        str(TARGET), *(f"{k}=={v}" for k, v in PEERS.items()), *EXTRA], check=True)
        marker.write_text(wanted)
    return dict(PEERS)


def env() -> dict[str, str]:
    import os
    import sys

    # nbdistributed starts its workers as plain `python`: make that this interpreter.
    path = f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ.get('PATH', '')}"
    return dict(os.environ, PYTHONPATH=f"{TARGET}{os.pathsep}{HERE}", PATH=path)
