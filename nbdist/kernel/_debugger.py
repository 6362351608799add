"""The notebook's side of pdb on an engine: show what it printed, ask the user (the notebook's
input box), and answer through the file the engine named. See `nbdist.engine._debug`."""

from __future__ import annotations

import os
from typing import Any

from nbdist.cluster import published
from nbdist.engine._debug import DEBUG_KEY_PREFIX


class DebugRelay:
    """Answers the debugger prompts that one request's ranks publish, each exactly once."""

    def __init__(self) -> None:
        self._answered: set[tuple[int, str]] = set()

    def serve(self, rank: int, ar: Any, ask: Any = input) -> bool:
        """Answer every new prompt from `ar`; True if there was one."""
        data = published(ar)
        keys = sorted((k for k in data if k.startswith(DEBUG_KEY_PREFIX) and (rank, k) not in self._answered),
                      key=lambda k: int(k.rpartition(":")[2]))
        for key in keys:
            self._answered.add((rank, key))
            prompt = data[key]
            output = str(prompt["output"])
            body, _, last = output.rpartition("\n")
            if body:
                print(body, flush=True)
            try:
                line = ask(f"[rank {rank}] {last or '(Pdb) '}")
            except (EOFError, KeyboardInterrupt):
                line = "q"
            except Exception:  # e.g. no input box (a notebook run headless): never leave pdb waiting
                _answer(str(prompt["reply"]), "q")
                raise
            _answer(str(prompt["reply"]), line)
        return bool(keys)


def _answer(reply: str, line: str) -> None:
    """Written whole, then renamed: the engine never reads half an answer."""
    with open(reply + ".tmp", "w") as handle:
        handle.write(line)
    os.replace(reply + ".tmp", reply)
