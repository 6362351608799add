"""Collectives refused while a cell runs on some ranks only (engines only).

`dist.all_reduce` in a cell that runs on rank 0 alone would wait forever for the ranks that
do not run it. The torch.distributed functions a cell calls are swapped, for that cell, for
ones that raise at once with the reason; point-to-point calls between ranks that both run the
cell still work. Calls that bypass these functions (DDP's own hooks) are found by the
kernel in the rank's stack instead."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch.distributed as dist

COLLECTIVES = (
    "all_gather", "all_gather_into_tensor", "all_gather_object", "all_reduce", "all_to_all",
    "all_to_all_single", "barrier", "broadcast", "broadcast_object_list", "gather", "gather_object",
    "monitored_barrier", "reduce", "reduce_scatter", "reduce_scatter_tensor", "scatter",
    "scatter_object_list",
)
POINT_TO_POINT = ("send", "recv", "isend", "irecv")


def _refuse(name: str, ranks: tuple[int, ...]) -> Callable[..., Any]:
    def refused(*args: Any, **kwargs: Any) -> Any:
        shown = ", ".join(map(str, ranks))
        raise RuntimeError(
            f"{name} is a collective: in a cell that runs on rank{'s' if len(ranks) > 1 else ''} {shown} only, "
            "it would wait forever for the ranks that do not run it. Run it on every rank (leave out --ranks)."
        )
    return refused


def _peer_checked(name: str, real: Callable[..., Any], ranks: tuple[int, ...]) -> Callable[..., Any]:
    @functools.wraps(real)
    def checked(tensor: Any, *args: Any, **kwargs: Any) -> Any:
        peer = args[0] if args else kwargs.get("dst", kwargs.get("src"))
        if isinstance(peer, int) and peer not in ranks:
            raise RuntimeError(f"{name} with rank {peer}, which does not run this cell (--ranks): it would wait "
                               "forever. Include that rank in --ranks.")
        return real(tensor, *args, **kwargs)
    return checked


@contextmanager
def only_ranks(ranks: tuple[int, ...]) -> Iterator[None]:
    saved = {name: getattr(dist, name) for name in (*COLLECTIVES, *POINT_TO_POINT) if hasattr(dist, name)}
    try:
        for name, real in saved.items():
            setattr(dist, name, _refuse(name, ranks) if name in COLLECTIVES else _peer_checked(name, real, ranks))
        yield
    finally:
        for name, real in saved.items():
            setattr(dist, name, real)
