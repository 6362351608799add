"""Adopting engines that have registered: ask each where it runs, give it a rank, its GPUs and
threads, and pin them there before any framework is imported."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from nbdist._net import LOOPBACK
from nbdist.cluster._config import PoolConfig
from nbdist.cluster._placement import place
from nbdist.engine import _calls as engine_calls


@dataclass(frozen=True)
class EngineInfo:
    """One engine as the pool knows it."""

    rank: int
    engine_id: int
    host: str
    pid: int
    gpu: str | None
    device: str
    address: str = LOOPBACK
    """Where this engine's host is reached from the others (loopback on one machine)."""
    interface: str | None = None
    threads: int = 1


def adopt(client: Any, new_ids: list[int], config: PoolConfig, controller_ip: str,
          timeout: float) -> tuple[EngineInfo, ...]:
    """The engines `new_ids`, placed and pinned, in rank order."""
    client[new_ids].use_cloudpickle()
    asks = [client[eid].apply_async(engine_calls.probe, controller_ip) for eid in new_ids]
    facts = [ar.get(timeout=timeout) for ar in asks]
    local = not config.launch.remote
    placements = place(
        facts,
        local_gpus=(config.gpus if config.uses_gpus else ()) if local else None,
        local_threads=config.threads_per_engine if local else None,
        use_gpus=config.use_gpus,
    )
    pins = [client[new_ids[p.index]].apply_async(engine_calls.pin, p.gpu, p.threads, p.local_rank, p.slots)
            for p in placements]
    for ar in pins:
        ar.get(timeout=timeout)
    return tuple(
        EngineInfo(
            rank=p.rank,
            engine_id=new_ids[p.index],
            host=facts[p.index].host,
            pid=facts[p.index].pid,
            gpu=p.gpu,
            device=f"cuda:{p.gpu}" if p.gpu is not None else "cpu",
            address=facts[p.index].address,
            interface=facts[p.index].interface,
            threads=p.threads,
        )
        for p in placements
    )
