"""Training techniques on a real 2-rank gloo group, each checked against one process."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import nbdist

pytestmark = pytest.mark.integration

FEATURES = """
import torch
from torch import nn
def features():
    torch.manual_seed(1)
    scale, shift = torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1), torch.tensor([0.0, 5.0, -5.0]).view(1, 3, 1)
    return torch.randn(16, 3, 5) * scale + shift
"""


def test_sync_batchnorm_matches_batchnorm_over_the_global_batch(pool: nbdist.Pool) -> None:
    pool.run(FEATURES + """
model = nbdist.torch.sync_batchnorm(nn.Sequential(nn.BatchNorm1d(3, momentum=0.5)))
x = features()[rank * 8:(rank + 1) * 8].requires_grad_()
(model(x) * torch.arange(5.0)).sum().backward()
stats = (model[0].running_mean.clone(), model[0].running_var.clone(), model[0].weight.grad.clone(), x.grad.clone())
""")
    exec(FEATURES, scope := {})  # the one-process reference, over all 16 samples
    x = scope["features"]().requires_grad_()
    bn = nn.BatchNorm1d(3, momentum=0.5)
    (bn(x) * torch.arange(5.0)).sum().backward()
    weight_grads = []
    for rank in (0, 1):
        mean, var, weight_grad, x_grad = pool.pull("stats", rank=rank)
        torch.testing.assert_close(mean, bn.running_mean)
        torch.testing.assert_close(var, bn.running_var)
        # The inputs' gradients flow through the global statistics: equal to the slice of the
        # one-process gradient (plain BatchNorm per rank would not be).
        torch.testing.assert_close(x_grad, x.grad[rank * 8:(rank + 1) * 8])  # type: ignore[index]
        weight_grads.append(weight_grad)
    torch.testing.assert_close(weight_grads[0] + weight_grads[1], bn.weight.grad)  # what DDP then averages


def test_gradient_accumulation_with_no_sync_equals_one_big_step_and_skips_allreduce(pool: nbdist.Pool) -> None:
    pool.run("""
import torch, torch.distributed as dist
from torch import nn
torch.manual_seed(0)
model = nn.Linear(4, 1)
x, y = torch.randn(32, 4), torch.randn(32, 1)
ddp = nn.parallel.DistributedDataParallel(model)
calls = []
def counting(state, bucket):
    calls.append(1)
    return dist.all_reduce(bucket.buffer().div_(world_size), async_op=True).get_future().then(lambda f: f.value()[0])
ddp.register_comm_hook(None, counting)
mine_x, mine_y = x[rank * 16:(rank + 1) * 16], y[rank * 16:(rank + 1) * 16]
for micro in range(4):
    part = slice(micro * 4, (micro + 1) * 4)
    if micro < 3:
        with ddp.no_sync():
            (nn.functional.mse_loss(ddp(mine_x[part]), mine_y[part]) / 4).backward()
    else:
        (nn.functional.mse_loss(ddp(mine_x[part]), mine_y[part]) / 4).backward()
result = (len(calls), model.weight.grad.clone())
""")
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    x, y = torch.randn(32, 4), torch.randn(32, 1)
    nn.functional.mse_loss(model(x), y).backward()
    for rank in (0, 1):
        calls, grad = pool.pull("result", rank=rank)
        assert calls == 1  # one all-reduce for 4 micro-batches
        torch.testing.assert_close(grad, model.weight.grad)


def test_autocast_runs_matmuls_in_reduced_precision_on_this_device(pool: nbdist.Pool) -> None:
    dtypes = pool.run("""
import torch
layer = torch.nn.Linear(8, 8)
with nbdist.torch.autocast():
    inside = layer(torch.randn(2, 8)).dtype
with nbdist.torch.autocast(enabled=False):
    outside = layer(torch.randn(2, 8)).dtype
str(inside), str(outside)
""").value
    assert dtypes == ("torch.bfloat16", "torch.float32")  # CPU engines: bfloat16
