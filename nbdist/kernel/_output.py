"""Engines' stdout and stderr, copied to the notebook as they arrive.

Three ways to show them: rank 0's alone (`rank0`); every rank's lines prefixed `[rank k]`
(`all`); or `grouped`, where a line every rank printed the same is shown once as
`[all ranks] ...` and only lines that differ are shown per rank. Grouped lines are matched by
their position in each rank's stream, and shown once every rank has printed that line (or
the cell has ended)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any, TextIO

MODES = ("rank0", "all", "grouped")


class OutputStream:
    def __init__(self, pending: Sequence[Any], output: str, ranks: Sequence[int] | None = None) -> None:
        self._pending = pending
        self._labels = list(ranks) if ranks is not None else list(range(len(pending)))
        self._mode = output
        self._shown = range(len(pending)) if output != "rank0" else range(1)
        self._offsets: dict[tuple[int, str], int] = {}
        self._partial: dict[tuple[int, str], str] = {}
        self._lines: dict[str, list[list[str]]] = {name: [[] for _ in pending] for name in ("stdout", "stderr")}
        self._grouped_upto: dict[str, int] = {"stdout": 0, "stderr": 0}

    def pump(self, final: bool = False) -> None:
        for index in self._shown:
            md = self._pending[index].metadata
            for name in ("stdout", "stderr"):
                text: str = md.get(name) or ""
                key = (index, name)
                start = self._offsets.get(key, 0)
                if len(text) <= start:
                    continue
                self._offsets[key] = len(text)
                self._take(key, text[start:])
        if final:
            for key in list(self._partial):
                self._take(key, "\n")
        if self._mode == "grouped":
            for name in ("stdout", "stderr"):
                self._emit_grouped(name, final)

    def _take(self, key: tuple[int, str], chunk: str) -> None:
        index, name = key
        stream = _stream(name)
        if self._mode == "rank0":
            stream.write(chunk)
            stream.flush()
            return
        chunk = self._partial.pop(key, "") + chunk
        lines = chunk.split("\n")
        tail = lines.pop()
        if tail:
            self._partial[key] = tail
        if self._mode == "all":
            if lines:
                stream.write("".join(f"[rank {self._labels[index]}] {line}\n" for line in lines))
                stream.flush()
        else:
            self._lines[name][index].extend(lines)

    def _emit_grouped(self, name: str, final: bool) -> None:
        per_rank = self._lines[name]
        # Only the final pump (after every rank's output has arrived) may take a rank's silence
        # for its end: a finished request's last lines can still be on their way.
        done = [final] * len(per_rank)
        out: list[str] = []
        i = self._grouped_upto[name]
        while True:
            have = [len(lines) > i for lines in per_rank]
            if not any(have):
                break
            if not all(h or d for h, d in zip(have, done, strict=True)):
                break  # a rank still running has not printed line i yet
            texts = [lines[i] for lines in per_rank if len(lines) > i]
            if all(have) and len(set(texts)) == 1 and len(per_rank) > 1:
                out.append(f"[all ranks] {texts[0]}\n")
            else:
                out.extend(f"[rank {self._labels[k]}] {lines[i]}\n" for k, lines in enumerate(per_rank)
                           if len(lines) > i)
            i += 1
        self._grouped_upto[name] = i
        if out:
            stream = _stream(name)
            stream.write("".join(out))
            stream.flush()


def _stream(name: str) -> TextIO:
    return sys.stdout if name == "stdout" else sys.stderr
