"""The one channel for nbdist's words to the user that are not errors (errors are raised).

A command's own result ("pool stopped") goes to stdout, under the command, like any output;
something that happened unasked (engines replaced before a cell) goes to stderr, which a
notebook shows apart, so it is not mistaken for the cell's output."""

from __future__ import annotations

import sys


def say(text: str, *, unasked: bool = False) -> None:
    print(f"nbdist: {text}", file=sys.stderr if unasked else sys.stdout, flush=True)
