"""Ranks, GPUs and threads for engines that have registered, from what each reported.

Ranks go host by host (by name), then by local order on the host (the scheduler's local rank where
there is one, else registration order), so `local_rank` indexes the host's devices as
torchrun would. A pure function of the reports: unit-tested without any engine.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from nbdist._errors import ConfigError
from nbdist._wire import EngineFacts


@dataclass(frozen=True)
class Placement:
    index: int
    """Position of the engine in the reports (registration order)."""
    rank: int
    local_rank: int
    gpu: str | None
    threads: int
    slots: int = 1
    """Engines on this host: `local_rank` of `slots` picks the engine's block of cores."""


def place(
    facts: Sequence[EngineFacts],
    *,
    local_gpus: tuple[str, ...] | None = None,
    local_threads: int | None = None,
    use_gpus: bool = True,
) -> list[Placement]:
    """One placement per report, in rank order.

    `local_gpus` / `local_threads` are the kernel's own decision for engines on its machine
    (they honour `--gpus` and `--gpus-per-engine`); engines elsewhere get one GPU each of
    those their host reports, and their host's cores shared out."""
    hosts = sorted({f.host for f in facts})  # by name: the same ranks after every restart
    by_host = {h: [i for i, f in enumerate(facts) if f.host == h] for h in hosts}
    placements = []
    rank = 0
    for host in hosts:
        members = sorted(by_host[host], key=lambda i: (_local_key(facts[i]), i))
        count = len(members)
        if local_gpus is not None:
            gpus: tuple[str, ...] = local_gpus
        elif use_gpus:
            gpus = facts[members[0]].gpus
            if gpus and len(gpus) < count:
                raise ConfigError(
                    f"host {host} shows {len(gpus)} GPUs for {count} engines: start at most {len(gpus)} "
                    "engines there (one per GPU), or use --gpus none for CPU engines."
                )
        else:
            gpus = ()
        threads = local_threads if local_threads is not None else max(1, facts[members[0]].cores // count)
        for local_rank, i in enumerate(members):
            placements.append(Placement(i, rank, local_rank, gpus[local_rank] if gpus else None, threads, count))
            rank += 1
    return placements


def _local_key(f: EngineFacts) -> int:
    return f.scheduler_local_rank if f.scheduler_local_rank is not None else 1 << 30
