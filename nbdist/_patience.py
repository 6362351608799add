"""How long to wait for something on a machine that may be busy with other work.

A timeout chosen on an idle machine fires too early on a loaded one (engines importing torch
while every core runs something else take several times longer), and a failure report then
blames the wrong thing. Waits that are about the machine's speed are stretched by its load."""

from __future__ import annotations

import os

MAX_STRETCH = 4.0


def stretch() -> float:
    """How many times longer things take here now than on an idle machine (1 to 4): the
    1-minute load average per core."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return 1.0
    return min(MAX_STRETCH, max(1.0, load / (os.cpu_count() or 1)))


def patience(seconds: float) -> float:
    return seconds * stretch()


def waited(asked: float, seconds: float) -> str:
    """`60 s`, or `150 s (60 s asked, stretched for this machine's load)`."""
    if seconds <= asked * 1.01:
        return f"{asked:g} s"
    return f"{seconds:.3g} s ({asked:g} s asked, stretched for this machine's load)"
