"""Engines' stdout and stderr, copied to the notebook as they arrive."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any


class OutputStream:
    """Copies each rank's streams (rank 0 only, or every rank prefixed `[rank k]`)."""

    def __init__(self, pending: Sequence[Any], output: str) -> None:
        self._pending = pending
        self._ranks = range(len(pending)) if output == "all" else range(1)
        self._prefix = output == "all"
        self._offsets: dict[tuple[int, str], int] = {}
        self._partial: dict[tuple[int, str], str] = {}

    def pump(self, final: bool = False) -> None:
        for rank in self._ranks:
            md = self._pending[rank].metadata
            for name in ("stdout", "stderr"):
                text: str = md.get(name) or ""
                key = (rank, name)
                start = self._offsets.get(key, 0)
                if len(text) <= start:
                    continue
                self._offsets[key] = len(text)
                self._write(key, text[start:], final)
        if final:
            for key in list(self._partial):
                self._write(key, "\n", final=True)

    def _write(self, key: tuple[int, str], chunk: str, final: bool) -> None:
        stream = sys.stdout if key[1] == "stdout" else sys.stderr
        if not self._prefix:
            stream.write(chunk)
            stream.flush()
            return
        chunk = self._partial.pop(key, "") + chunk
        lines = chunk.split("\n")
        tail = lines.pop()
        if tail:
            self._partial[key] = tail
        if lines:
            stream.write("".join(f"[rank {key[0]}] {line}\n" for line in lines))
            stream.flush()
