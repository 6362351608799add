"""Checkpoint and resume: kill an engine mid-training, recover, restore, finish.

The resumed run must end with exactly the parameters of an uninterrupted run (the data of
each step is derived from the step number), and lose no more than the checkpoint interval.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

import nbdist

pytestmark = pytest.mark.integration

EVERY = 20
TOTAL = 200

SETUP = """
import time, torch
from torch import nn

torch.manual_seed(0)
model = nbdist.torch.prepare(nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1)))
opt = torch.optim.Adam(model.parameters(), lr=1e-2)

def train(start, total, every, path, pause):
    step = start
    for step in range(start, total):
        g = torch.Generator().manual_seed(1000 * step + rank)
        x = torch.randn(16, 8, generator=g)
        loss = nn.functional.mse_loss(model(x), x.sum(1, keepdim=True))
        opt.zero_grad()
        loss.backward()
        opt.step()
        nbdist.report(step=step, loss=loss.item())
        if (step + 1) % every == 0 and path:
            nbdist.checkpoint.save(path, model=model, optimizer=opt, step=step + 1)
        time.sleep(pause)
    return step + 1
"""


def params(pool: nbdist.Pool) -> list[float]:
    pool.run("flat = torch.cat([p.detach().flatten() for p in model.parameters()])")
    return [float(v) for v in pool.pull("flat").tolist()]


def test_kill_mid_training_then_restore_and_finish(pool: nbdist.Pool, tmp_path: Path) -> None:
    pool.run(SETUP)
    pool.run(f"train(0, {TOTAL}, {EVERY}, None, 0.0)")
    reference = params(pool)

    path = tmp_path / "ckpt.pt"
    pool.run(SETUP)
    victim = pool.engines[1].pid
    killer = threading.Timer(1.5, lambda: __import__("os").kill(victim, 9))
    before = len(pool.history)
    killer.start()
    with pytest.raises(nbdist.DistributedCellError) as info:
        pool.run(f"train(0, {TOTAL}, {EVERY}, {str(path)!r}, 0.02)")
    killer.join()
    assert "SIGKILL" in info.value.summary and info.value.lost_state
    frame = pool.history.frame().iloc[before:]
    last_seen = int(frame[(frame["rank"] == 0) & (frame.kind == "train")].step.max())

    pool.run(SETUP)
    start = pool.run(f"nbdist.checkpoint.restore({str(path)!r}, model=model, optimizer=opt)").value
    assert start is not None and start % EVERY == 0 and start > 0
    assert last_seen + 1 - start <= EVERY + 1, "lost more than one checkpoint interval"
    assert pool.run(f"train({start}, {TOTAL}, {EVERY}, {str(path)!r}, 0.0)").value == TOTAL
    resumed = params(pool)
    assert max(abs(a - b) for a, b in zip(resumed, reference, strict=True)) < 1e-6
    assert not list(tmp_path.glob(".*.tmp")), "a temporary checkpoint file was left behind"


def test_restore_of_missing_file_is_none(pool: nbdist.Pool, tmp_path: Path) -> None:
    pool.run(SETUP)
    assert pool.run(f"nbdist.checkpoint.restore({str(tmp_path / 'none.pt')!r}, model=model)").value is None


def test_killed_writer_leaves_previous_checkpoint_intact(pool: nbdist.Pool, tmp_path: Path) -> None:
    """Rank 0 dies in the middle of writing: the old checkpoint must still load."""
    path = tmp_path / "ckpt.pt"
    pool.run(SETUP)
    pool.run(f"nbdist.checkpoint.save({str(path)!r}, model=model, optimizer=opt, step=7)")
    # Make torch.save write half a file and then kill the process, on rank 0 only.
    crash = (
        "import os, torch\n"
        "real_save = torch.save\n"
        "def torn(obj, f):\n"
        "    f.write(b'partial' * 1000); f.flush(); os.kill(os.getpid(), 9)\n"
        "torch.save = torn if rank == 0 else real_save\n"
        f"nbdist.checkpoint.save({str(path)!r}, model=model, optimizer=opt, step=8)"
    )
    started = time.monotonic()
    with pytest.raises(nbdist.DistributedCellError):
        pool.run(crash)
    assert time.monotonic() - started < 30
    pool.run(SETUP)
    assert pool.run(f"nbdist.checkpoint.restore({str(path)!r}, model=model, optimizer=opt)").value == 7
    # The torn write left its temporary file; the next save removes it.
    assert [p.name for p in tmp_path.glob(".ckpt.pt.*.tmp")] != []
    pool.run(f"nbdist.checkpoint.save({str(path)!r}, model=model, optimizer=opt, step=9)")
    assert list(tmp_path.glob(".ckpt.pt.*.tmp")) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]


RETRY_CELL = """
import os, time, torch
torch.manual_seed(0)
model = nbdist.torch.prepare(torch.nn.Linear(8, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
start = nbdist.checkpoint.restore({path!r}, model=model, optimizer=opt) or 0
for step in range(start, {total}):
    g = torch.Generator().manual_seed(step * 10 + rank)
    x = torch.randn(16, 8, generator=g)
    loss = torch.nn.functional.mse_loss(model(x), x.sum(1, keepdim=True))
    opt.zero_grad()
    loss.backward()
    opt.step()
    nbdist.report(step=step, loss=loss.item(), samples=16)
    if (step + 1) % {every} == 0:
        nbdist.checkpoint.save({path!r}, model=model, optimizer=opt, step=step + 1)
    if {kill} and rank == 1 and step == 50 and not os.path.exists({mark!r}):
        open({mark!r}, "w").close()
        os.kill(os.getpid(), 9)
    time.sleep(0.01)
[float(v) for v in model.module.weight.detach().flatten()] + [float(model.module.bias.detach())]
"""


def test_retries_resume_from_the_last_checkpoint_after_an_engine_dies(pool: nbdist.Pool, tmp_path: Path) -> None:
    total, every = 100, 20
    began = time.monotonic()
    reference = pool.run(RETRY_CELL.format(path=str(tmp_path / "ref.pt"), total=total, every=every, kill=False,
                                           mark="")).value
    uninterrupted = time.monotonic() - began
    before = len(pool.history)
    cell = RETRY_CELL.format(path=str(tmp_path / "ckpt.pt"), total=total, every=every, kill=True,
                             mark=str(tmp_path / "killed"))
    began = time.monotonic()
    result = pool.run(cell, retries=2)
    retried = time.monotonic() - began
    assert (tmp_path / "killed").exists() and result.retries == 1
    assert max(abs(a - b) for a, b in zip(result.value, reference, strict=True)) < 1e-6
    steps = pool.history.frame().iloc[before:]
    steps = steps[(steps["rank"] == 0) & (steps.kind == "train")].step.astype(int).tolist()
    drop = next(i for i in range(1, len(steps)) if steps[i] < steps[i - 1])
    assert steps[drop] == 40 and steps[-1] == total - 1  # resumed at the last checkpoint, one cell's history
    assert steps[drop - 1] + 1 - steps[drop] <= every, "lost more than one checkpoint interval"
    assert len(result.retry_seconds) == 1 and result.retry_seconds[0] < 30
    print(f"time lost to the failure: {retried - uninterrupted:.1f} s in all ({uninterrupted:.1f} s uninterrupted, "
          f"{retried:.1f} s with the failure; {result.retry_seconds[0]:.1f} s of it to be running again)")


def test_a_raising_rank_is_retried_only_when_asked(pool: nbdist.Pool, tmp_path: Path) -> None:
    flaky = (f"import os\nif rank == 1 and not os.path.exists({str(tmp_path / 'once')!r}):\n"
             f"    open({str(tmp_path / 'once')!r}, 'w').close()\n    raise RuntimeError('flaky')\nrank + 10")
    with pytest.raises(nbdist.DistributedCellError) as info:
        pool.run(flaky, retries=3)
    assert "flaky" in info.value.summary and not info.value.lost_state
    (tmp_path / "once").unlink()
    result = pool.run(flaky, retries=3, retries_on="error")
    assert result.retries == 1 and result.value == 10
    with pytest.raises(nbdist.ConfigError, match="retries must be a whole number"):
        pool.run("1", retries=-1)
