"""Forming the process group on first use: addresses, free ports, then every rank joins.

A pool serves one formation (a backend, and for TensorFlow one strategy with its options) for
its engines' life: frameworks cannot leave a group and join another in the same process."""

from __future__ import annotations

from dataclasses import replace

from nbdist._errors import PoolStateError
from nbdist._net import LOOPBACK
from nbdist._wire import Formation, RankInfo
from nbdist.backends import backend_spec
from nbdist.cluster import EngineCluster, EngineInfo
from nbdist.engine import _calls as engine_calls
from nbdist.kernel._contain import gather_or_fail


def refuse_switch(now: Formation, wanted: Formation) -> PoolStateError:
    return PoolStateError(
        f"this pool's engines are joined for {now.describe()}; {wanted.describe()} needs fresh engines: "
        f"add --restart to the cell (or run `%nbdist restart`; engine state is cleared)."
    )


def form_group(cluster: EngineCluster, formation: Formation) -> None:
    """Join every rank for `formation`. Each address is the engine's own on the route to the
    controller (loopback on one machine); each port is chosen free by the engine that will
    listen on it."""
    spec = backend_spec(formation.backend)
    engines, views = cluster.engines, cluster.views
    strategy = spec.strategy(formation.strategy) if formation.strategy else None
    options = dict(formation.options)
    if strategy is not None:
        strategy.check(len(engines), options)
    master = engines[0].address
    port = gather_or_fail(cluster, [views[0].apply_async(engine_calls.free_port, master)],
                          what="choosing the rendezvous port", timeout=cluster.config.start_timeout)[0]
    peers: tuple[str, ...] = ()
    if spec.needs_peers:
        hosts = [e.address for e in engines]
        hosts += [master] * (strategy.extra_servers(len(engines), options) if strategy is not None else 0)
        asks = [views[0 if i >= len(views) else i].apply_async(engine_calls.free_port, host)
                for i, host in enumerate(hosts)]
        ports = gather_or_fail(cluster, asks, what="choosing ports", timeout=cluster.config.start_timeout)
        peers = tuple(f"{h}:{p}" for h, p in zip(hosts, ports, strict=True))
    # On one machine the torch group meets through a fresh file in the cluster's private folder.
    store = cluster.scratch_file("store") if all(e.address == LOOPBACK for e in engines) else None
    infos = [replace(i, peers=peers, store=store) for i in rank_infos(engines, master_addr=master, master_port=port)]
    pending = [view.apply_async(engine_calls.join, info, formation) for view, info in zip(views, infos, strict=True)]
    devices = gather_or_fail(cluster, pending, what=f"forming the {formation.backend} process group",
                             timeout=cluster.config.start_timeout)
    cluster.joined(formation, devices)


def rank_infos(engines: tuple[EngineInfo, ...], master_addr: str, master_port: int) -> list[RankInfo]:
    hosts = list(dict.fromkeys(e.host for e in engines))
    infos = []
    for e in engines:
        same_host = [o for o in engines if o.host == e.host]
        infos.append(
            RankInfo(
                rank=e.rank,
                local_rank=same_host.index(e),
                world_size=len(engines),
                local_world_size=len(same_host),
                node_rank=hosts.index(e.host),
                master_addr=master_addr,
                master_port=master_port,
                gpu=e.gpu,
                threads=e.threads,
                interface=e.interface,
            )
        )
    return infos
