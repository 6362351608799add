"""A real kernel (jupyter_client, as a notebook runs it) with a real 2-engine pool, and what a
cell run there shows the user: its streams, displays, value and error."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from jupyter_client.blocking.client import BlockingKernelClient


@dataclass
class Ran:
    ok: bool
    stdout: str = ""
    stderr: str = ""
    error: str = ""
    value: str = ""
    prompts: list[str] = field(default_factory=list)
    displays: list[dict[str, Any]] = field(default_factory=list)
    """display_data and update_display_data contents, each with its "kind"."""
    seconds: float = 0.0

    @property
    def problem(self) -> str:
        """What the user reads of a failure: the error, or a UsageError (printed to stderr)."""
        return self.error + self.stderr


def execute(kc: BlockingKernelClient, code: str, answers: list[str] | None = None) -> Ran:
    """Run a cell as the notebook does; answer input() prompts from `answers`, in order."""
    ran = Ran(ok=False)
    pending = list(answers or [])

    def output(msg: dict[str, Any]) -> None:
        kind, content = msg["msg_type"], msg["content"]
        if kind == "stream":
            if content["name"] == "stdout":
                ran.stdout += content["text"]
            else:
                ran.stderr += content["text"]
        elif kind == "error":
            ran.error += "\n".join(content["traceback"])
        elif kind in ("display_data", "update_display_data"):
            ran.displays.append({"kind": kind, **content})
        elif kind == "execute_result":
            ran.value = content["data"].get("text/plain", "")

    def stdin(msg: dict[str, Any]) -> None:
        ran.prompts.append(msg["content"]["prompt"])
        kc.input(pending.pop(0) if pending else "q")

    started = time.monotonic()
    reply = kc.execute_interactive(code, timeout=120, output_hook=output, stdin_hook=stdin,
                                   allow_stdin=True)
    ran.seconds = time.monotonic() - started
    ran.ok = reply["content"]["status"] == "ok"
    return ran


def screen(text: str) -> str:
    """What a notebook shows of streamed text: each carriage return draws over its line."""
    return "\n".join(line.rstrip("\r").rpartition("\r")[2] for line in text.split("\n"))
