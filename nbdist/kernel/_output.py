"""Engines' stdout and stderr, copied to the notebook as they arrive.

Three ways to show them: rank 0's alone (`rank0`); every rank's lines prefixed `[rank k]`
(`all`); or `grouped`, where a line every rank printed the same is shown once as
`[all ranks] ...` and only lines that differ are shown per rank. Grouped lines are matched by
their position in each rank's stream, and shown once every rank has printed that line (or
the cell has ended).

Carriage returns (progress bars) are kept as the frontend expects them for rank 0's text, but
each piece is first cut to the last state of its lines, so a bar redrawn a thousand times
between two polls costs one line. In labelled modes a line is shown once it is complete, as
its final state. Displays (figures, tables, widgets' fallbacks, `update_display`) of the
ranks shown are published into the cell's output as they come."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any, TextIO

from nbdist.cluster import Outputs, outputs_of

MODES = ("rank0", "all", "grouped")


class OutputStream:
    def __init__(self, pending: Sequence[Any], output: str, ranks: Sequence[int] | None = None,
                 outputs: Sequence[Outputs] | None = None) -> None:
        """`outputs`: where each request's pieces arrive (by default, the client's tap)."""
        self._pending = pending
        self._outputs: list[Outputs] = list(outputs) if outputs is not None else [outputs_of(ar) for ar in pending]
        self._shown_displays = [0] * len(pending)
        self._labels = list(ranks) if ranks is not None else list(range(len(pending)))
        self._mode = output
        self._shown = range(len(pending)) if output != "rank0" else range(1)
        self._offsets: dict[tuple[int, str], int] = {}
        self._partial: dict[tuple[int, str], str] = {}
        self._lines: dict[str, list[list[str]]] = {name: [[] for _ in pending] for name in ("stdout", "stderr")}
        self._grouped_upto: dict[str, int] = {"stdout": 0, "stderr": 0}

    def pump(self, final: bool = False) -> None:
        for index in self._shown:
            outputs = self._outputs[index]
            for name in ("stdout", "stderr"):
                pieces = outputs.stream(name)
                key = (index, name)
                start = self._offsets.get(key, 0)
                end = len(pieces)
                if end <= start:
                    continue
                self._offsets[key] = end
                self._take(key, "".join(pieces[start:end]))
            self._display(index, outputs)
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
            stream.write(latest(chunk))
            stream.flush()
            return
        chunk = self._partial.pop(key, "") + chunk
        lines = chunk.split("\n")
        tail = lines.pop()
        if tail:
            self._partial[key] = tail
        lines = [final_state(line) for line in lines]
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


    def _display(self, index: int, outputs: Outputs) -> None:
        start, end = self._shown_displays[index], len(outputs.displays)
        if end <= start:
            return
        self._shown_displays[index] = end
        sys.stdout.flush()
        sys.stderr.flush()
        for kind, content in outputs.displays[start:end]:
            if self._mode != "rank0" and kind == "display_data":
                print(f"[rank {self._labels[index]}]", flush=True)
            publish(content, update=kind == "update_display_data")


def publish(content: dict[str, Any], update: bool = False) -> None:
    """Show an engine's display in the cell's output; outside IPython, its plain text."""
    from IPython import get_ipython

    shell = get_ipython()
    data = content.get("data") or {}
    if shell is None:
        print(data.get("text/plain", ""))
        return
    shell.display_pub.publish(data=data, metadata=content.get("metadata") or {},
                              transient=content.get("transient") or None, update=update)


def latest(text: str) -> str:
    """`text` with each line cut to what a terminal would show after its last carriage return.
    A line that ends in one keeps it (the next piece draws over it); a line that had one keeps
    a leading one, so it still draws over what earlier pieces left on that line."""
    if "\r" not in text:
        return text
    out = []
    for line in text.split("\n"):
        if "\r" in line:
            body = line.rstrip("\r")
            line = "\r" + body.rpartition("\r")[2] + ("\r" if len(body) < len(line) else "")
        out.append(line)
    return "\n".join(out)


def final_state(line: str) -> str:
    """What a complete line shows once every carriage return in it has drawn over the line."""
    return line.rstrip("\r").rpartition("\r")[2]


def _stream(name: str) -> TextIO:
    return sys.stdout if name == "stdout" else sys.stderr
