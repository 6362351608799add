"""What the multi-host and scheduler tests share: a notebook shell with no pool of its own
(the session's pool put back afterwards), and a DDP cell with its one-process reference."""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from contextlib import contextmanager

from IPython.core.interactiveshell import InteractiveShell

from nbdist.kernel._magics import NbdistMagics


@contextmanager
def fresh_notebook() -> Iterator[tuple[InteractiveShell, NbdistMagics]]:
    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "nbdist")
    magics = ip.magics_manager.registry["NbdistMagics"]
    assert isinstance(magics, NbdistMagics)
    saved = magics.pool
    magics.pool = None
    try:
        yield ip, magics
    finally:
        if magics.pool is not None and magics.pool.is_running:
            magics.pool.stop()
        magics.pool = saved


DDP_CELL = textwrap.dedent("""
    import torch
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel as DDP
    torch.manual_seed(0)
    model = DDP(nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    X, Y = torch.randn(64, 4, generator=g), torch.randn(64, 1, generator=g)
    for step in range(20):
        opt.zero_grad()
        nn.functional.mse_loss(model(X[rank::world_size]), Y[rank::world_size]).backward()
        opt.step()
    [round(float(v), 5) for v in torch.cat([p.detach().flatten() for p in model.parameters()])]
""")
"""Its last value is the parameters after 20 steps, rounded: equal to `one_process(world_size)`."""


def one_process(world_size: int) -> list[float]:
    """DDP_CELL in one process: the mean of the ranks' shard losses has their averaged gradient."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    X, Y = torch.randn(64, 4, generator=g), torch.randn(64, 1, generator=g)
    for _ in range(20):
        opt.zero_grad()
        losses = [nn.functional.mse_loss(model(X[r::world_size]), Y[r::world_size]) for r in range(world_size)]
        (sum(losses) / world_size).backward()
        opt.step()
    return [round(float(v), 5) for v in torch.cat([p.detach().flatten() for p in model.parameters()])]
