"""GPU paths on real GPUs: one engine per GPU, NCCL, NVML load, mixed precision.

Skipped where NVML sees no GPU (CI and the development machine have none); run on a GPU
machine with `python -m pytest tests/test_gpu.py`. Results are checked against one process
training on the same global batches."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest

import nbdist
from nbdist._devices import visible_gpus

GPUS = visible_gpus(os.environ)
pytestmark = [
    pytest.mark.integration,
    pytest.mark.gpu,
    pytest.mark.skipif(not GPUS, reason="no GPU visible to NVML (GPU paths need a GPU machine)"),
]

STEPS = 20
COMMON = """
import torch
from torch import nn

def build():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 1))

def batch(step, world):
    g = torch.Generator().manual_seed(step)
    x = torch.randn(8 * world, 32, generator=g)
    return x, x.sum(dim=1, keepdim=True)
"""

TRAIN = COMMON + f"""
model = nbdist.torch.prepare(build())
opt = torch.optim.SGD(model.parameters(), lr=0.05)
for step in range({STEPS}):
    x, y = batch(step, world_size)
    mine = slice(None) if nbdist.engine.current().strategy.name == "tensor" else slice(rank * 8, (rank + 1) * 8)
    loss = nn.functional.mse_loss(model(x[mine].to(device)), y[mine].to(device))
    opt.zero_grad(); loss.backward(); opt.step()
    nbdist.report(step=step, loss=loss.item(), samples=8)
    time.sleep(0.1)  # long enough for the load sampler to see the GPU twice a second
"""


def reference(world: int) -> list[float]:
    """The same steps in one process on the CPU, each on the whole global batch."""
    import torch
    from torch import nn

    ns: dict[str, object] = {}
    exec(COMMON, ns)
    model = ns["build"]()  # type: ignore[operator]
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(STEPS):
        x, y = ns["batch"](step, world)  # type: ignore[operator]
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return torch.cat([p.detach().flatten() for p in model.parameters()]).tolist()


@pytest.fixture(scope="module")
def gpu_pool() -> Iterator[nbdist.Pool]:
    with nbdist.Pool() as p:  # no options: one engine per visible GPU
        yield p


def test_one_engine_per_gpu_each_on_its_own_gpu_over_nccl(gpu_pool: nbdist.Pool) -> None:
    assert len(gpu_pool.engines) == len(GPUS)
    seen = gpu_pool.run("import os, torch\nimport torch.distributed as dist\n"
                        "_mine = (rank, os.environ['CUDA_VISIBLE_DEVICES'], str(device), torch.cuda.device_count(),\n"
                        "         dist.get_backend(), str(nbdist.torch.device()))\n"
                        "_all = [None] * world_size\n"
                        "dist.all_gather_object(_all, _mine)\n"
                        "_all").value
    assert [s[0] for s in seen] == list(range(len(GPUS)))
    assert [s[1] for s in seen] == list(GPUS)  # each engine sees exactly its own GPU
    for _, _, dev, count, backend, helper in seen:
        assert (dev, count, backend, helper) == ("cuda:0", 1, "nccl", "cuda:0")
    assert [s.device for s in gpu_pool.status()] == [f"cuda:{g}" for g in GPUS]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "tensor"])
def test_training_on_gpus_matches_one_process(gpu_pool: nbdist.Pool, strategy: str) -> None:
    gpu_pool.run("import time\n" + TRAIN, strategy=strategy)
    pulled = gpu_pool.pull("model")  # back on the CPU, wrapper removed, shards gathered
    import torch

    flat = torch.cat([p.detach().flatten() for p in pulled.parameters()]).tolist()
    assert all(p.device.type == "cpu" for p in pulled.parameters())
    expected = reference(len(GPUS))
    assert max(abs(a - b) for a, b in zip(flat, expected, strict=True)) < 1e-4


def test_nvml_load_samples_arrive_from_every_gpu_engine_and_the_dashboard_plots_them(
        gpu_pool: nbdist.Pool) -> None:
    dashboard = nbdist.Dashboard(keep_png=False)
    before = len(gpu_pool.history)
    gpu_pool.run("import time\n" + TRAIN, observers=[dashboard])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        frame = nbdist.history(gpu_pool).iloc[before:]
        load = frame[frame.kind == "load"]
        if not load.empty and set(load["rank"]) == set(range(len(GPUS))):
            break
        time.sleep(0.5)
    assert set(load["rank"]) == set(range(len(GPUS)))
    assert load["gpu_util"].notna().all() and load["gpu_util"].between(0, 100).all()
    assert (load["gpu_mem_mb"] > 0).all()  # the engine's CUDA context at least
    # The dashboard's memory panel shows GPU memory (not the engine's RSS) for a GPU engine.
    png = dashboard.render(final=True)
    plotted = {line.get_label(): list(line.get_ydata()) for line in dashboard.figure.axes["memory"].lines}
    mine = load[load["rank"] == 0]
    assert max(plotted["rank 0"]) == pytest.approx(mine.gpu_mem_mb.max(), rel=1e-6)
    assert max(plotted["rank 0"]) != pytest.approx(mine.rss_mb.max(), rel=0.05)
    os.makedirs("artifacts", exist_ok=True)
    with open("artifacts/gpu_dashboard.png", "wb") as f:  # for a look: a CI artifact where a GPU runs it
        f.write(png)


def test_mixed_precision_uses_bfloat16_on_gpu(gpu_pool: nbdist.Pool) -> None:
    dtype = gpu_pool.run("import torch\nwith nbdist.torch.autocast():\n"
                         "    _out = torch.nn.Linear(4, 4).to(device)(torch.randn(2, 4, device=device))\n"
                         "str(_out.dtype)").value
    assert dtype == "torch.bfloat16"


def test_gpus_none_gives_cpu_engines_on_gloo() -> None:
    with nbdist.Pool(n=2, gpus="none") as cpu_pool:
        seen = cpu_pool.run("import os, torch.distributed as dist\n"
                            "(str(device), os.environ.get('CUDA_VISIBLE_DEVICES'), dist.get_backend())").value
    assert seen == ("cpu", "", "gloo")
