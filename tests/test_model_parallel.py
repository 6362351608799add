"""FSDP, pipeline (GPipe and 1F1B) and tensor parallelism on a real 2-rank gloo group, each
checked against the same training in one process."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import nbdist

pytestmark = pytest.mark.integration

COMMON = """
import torch
from torch import nn
def build():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4))
def batch(step):
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(16, 8, generator=g)
    return x, torch.sin(x[:, :4]) + x[:, 4:]
STEPS = 5
"""


def reference() -> tuple[list[float], nn.Module]:
    scope: dict[str, Any] = {}
    exec(COMMON, scope)
    model = scope["build"]()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for step in range(scope["STEPS"]):
        x, y = scope["batch"](step)
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, model


def assert_same_parameters(pulled: nn.Module, expected: nn.Module) -> None:
    assert type(pulled) is type(expected)
    for (name, a), (_, b) in zip(pulled.state_dict().items(), expected.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_fsdp_matches_one_process_and_halves_parameter_memory(pool: nbdist.Pool) -> None:
    # The shared pool's engines hold models from other tests: drop them, so the memory
    # figures are this model's (status counts every module and optimizer on the engine).
    pool.run("import torch\nfor _n in [n for n, v in list(globals().items())\n"
             "           if isinstance(v, (torch.nn.Module, torch.optim.Optimizer, nbdist.torch.Pipeline))]:\n"
             "    del globals()[_n]")
    pool.run(COMMON + """
model = nbdist.torch.prepare(build())
opt = torch.optim.SGD(model.parameters(), lr=0.1)
losses = []
for step in range(STEPS):
    x, y = batch(step)
    mine = slice(rank * 8, (rank + 1) * 8)  # each rank half of the global batch, as in DDP
    loss = nn.functional.mse_loss(model(x[mine]), y[mine])
    opt.zero_grad(); loss.backward(); opt.step()
    losses.append(loss.item())
""", strategy="fsdp")
    expected_losses, expected = reference()
    pulled = pool.pull("model")  # gathered by both ranks into one plain model
    assert_same_parameters(pulled, expected)
    memory = pool.memory()
    full_mb = sum(p.numel() * 4 for p in expected.parameters()) / 2**20
    for rank in (0, 1):
        assert memory[rank]["param_mb"] == pytest.approx(full_mb / 2, rel=0.15)  # sharded: about half each
        assert memory[rank]["optim_mb"] == 0.0  # plain SGD keeps no state
    first = [pool.pull("losses", rank=r)[0] for r in (0, 1)]
    assert sum(first) / 2 == pytest.approx(expected_losses[0], rel=1e-5)  # the mean of the two halves


def test_fsdp_checkpoint_is_whole_and_restores_into_shards(pool: nbdist.Pool, tmp_path: Any) -> None:
    path = tmp_path / "fsdp.pt"
    pool.run(COMMON + f"""
model = nbdist.torch.prepare(build())
opt = torch.optim.Adam(model.parameters(), lr=0.01)
x, y = batch(0)
nn.functional.mse_loss(model(x), y).backward(); opt.step()
nbdist.checkpoint.save({str(path)!r}, model=model, optimizer=opt, step=1)
before = nbdist.torch.unwrap(model).state_dict()
fresh = nbdist.torch.prepare(build())
fresh_opt = torch.optim.Adam(fresh.parameters(), lr=0.01)
step = nbdist.checkpoint.restore({str(path)!r}, model=fresh, optimizer=fresh_opt)
after = nbdist.torch.unwrap(fresh).state_dict()
same = step == 1 and all(torch.equal(before[k], after[k]) for k in before)
""", strategy="fsdp")
    saved = torch.load(path, weights_only=False)
    shapes = {k: tuple(v.shape) for k, v in saved["model"].items()}
    assert shapes["0.weight"] == (32, 8) and shapes["4.weight"] == (4, 32)  # whole tensors, not shards
    assert pool.pull("same", rank=0) and pool.pull("same", rank=1)


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_pipeline_matches_one_process(pool: nbdist.Pool, schedule: str) -> None:
    pool.run(COMMON + f"""
pipe = nbdist.torch.prepare(build(), microbatches=4, schedule={schedule!r}, loss_fn=nn.functional.mse_loss)
opt = torch.optim.SGD(pipe.parameters(), lr=0.1)
losses = []
for step in range(STEPS):
    x, y = batch(step)
    opt.zero_grad()
    losses.append(pipe.step(x if pipe.is_first else None, y if pipe.is_last else None))
    opt.step()
    if losses[-1] is not None:
        nbdist.report(step=step, loss=losses[-1], samples=16)
stage = pipe.module
""", strategy="pipeline")
    expected_losses, expected = reference()
    last = pool.pull("losses", rank=1)
    assert pool.pull("losses", rank=0) == [None] * 5  # the loss lives on the last stage
    assert last == pytest.approx(expected_losses, rel=1e-5)
    first_stage, last_stage = pool.pull("stage", rank=0), pool.pull("stage", rank=1)
    pulled = nn.Sequential(*first_stage, *last_stage)
    assert_same_parameters(pulled, expected)


def test_tensor_parallel_matches_one_process(pool: nbdist.Pool) -> None:
    pool.run(COMMON + """
from torch.distributed.tensor import DTensor
model = nbdist.torch.prepare(build())  # mlp_plan: Linear 0 column-wise, Linear 2 row-wise, Linear 4 replicated
opt = torch.optim.SGD(model.parameters(), lr=0.1)
for step in range(STEPS):
    x, y = batch(step)  # tensor parallel: every rank sees the same batch
    loss = nn.functional.mse_loss(model(x), y)
    opt.zero_grad(); loss.backward(); opt.step()
local_shape = tuple(model[0].weight.to_local().shape)
""", strategy="tensor")
    expected_losses, expected = reference()
    assert pool.pull("local_shape", rank=0) == (16, 8)  # half of the 32 output features
    assert_same_parameters(pool.pull("model"), expected)


ATTENTION = """
import torch
from torch import nn
class Attention(nn.Module):
    def __init__(self, dim=16, heads=4):
        super().__init__()
        self.head_dim = dim // heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(dim, dim) for _ in range(4))
    def forward(self, x):
        b, t, _ = x.shape
        q = self.q_proj(x)
        heads = q.shape[-1] // self.head_dim  # the local head count: half of them on each rank
        def split(z):
            return z.view(b, t, heads, self.head_dim).transpose(1, 2)
        q, k, v = split(q), split(self.k_proj(x)), split(self.v_proj(x))
        a = torch.softmax(q @ k.transpose(-2, -1) / self.head_dim ** 0.5, dim=-1) @ v
        return self.out_proj(a.transpose(1, 2).reshape(b, t, heads * self.head_dim))
def build():
    torch.manual_seed(0)
    return Attention()
def batch(step):
    g = torch.Generator().manual_seed(200 + step)
    x = torch.randn(4, 6, 16, generator=g)
    return x, torch.tanh(x.flip(1))
def train(model, steps=5):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for step in range(steps):
        x, y = batch(step)
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad(); loss.backward(); opt.step()
        losses.append(loss.item())
    return losses
"""


def test_tensor_parallel_attention_plan_splits_heads_and_matches_one_process(pool: nbdist.Pool) -> None:
    pool.run(ATTENTION + """
model = nbdist.torch.prepare(build(), plan=nbdist.torch.attention_plan())
losses = train(model)
local_q = tuple(model.q_proj.weight.to_local().shape)
""", strategy="tensor")
    scope: dict[str, Any] = {}
    exec(ATTENTION, scope)
    expected = scope["build"]()
    expected_losses = scope["train"](expected)
    assert pool.pull("local_q", rank=1) == (8, 16)  # 2 of the 4 heads on each rank
    assert pool.pull("losses") == pytest.approx(expected_losses, rel=1e-5)
    pulled = pool.pull("model").state_dict()
    for name, value in expected.state_dict().items():
        torch.testing.assert_close(pulled[name], value, rtol=1e-5, atol=1e-6, msg=name)
