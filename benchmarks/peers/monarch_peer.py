"""torchmonarch (Meta's single-controller actor API): two actor processes on this host, each
forming the same gloo process group as the other peers' first cell, then a no-op round trip to
both, which is what a warm empty cell is."""

from __future__ import annotations

import json
import socket
import statistics
import sys
import time

REPEATS = int(sys.argv[1])


def port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def main() -> None:
    started = time.perf_counter()  # the notebook's import of monarch is part of the cold start
    from monarch.actor import Actor, current_rank, current_size, endpoint, this_host

    class Rank(Actor):
        @endpoint
        def join(self, master_port: int) -> int:
            import torch
            import torch.distributed as dist

            torch.set_num_threads(1)
            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{master_port}",
                                    rank=current_rank().rank, world_size=current_size()["procs"])
            return int(dist.get_world_size())

        @endpoint
        def nothing(self) -> None:
            return None

    procs = this_host().spawn_procs(per_host={"procs": 2})
    ranks = procs.spawn("rank", Rank)
    worlds = [value for _, value in ranks.join.call(port()).get()]
    assert worlds == [2, 2], worlds
    cold = time.perf_counter() - started
    times = []
    for _ in range(REPEATS):
        t = time.perf_counter()
        ranks.nothing.call().get()
        times.append(time.perf_counter() - t)
    print(json.dumps({"cold_s": cold, "warm_ms": statistics.median(times) * 1000}))
    procs.stop().get()


if __name__ == "__main__":
    main()
