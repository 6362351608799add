"""Public training code pasted into cells, unchanged, through a real kernel on a real 2-engine
pool: torchrun scripts that own their process group, a script file run with its arguments,
Lightning's DDP, SyncBatchNorm, and what cells print and show (figures, tables, progress
bars, a Keras `History`). Distributed results are checked against one process."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
from _kernel import execute, screen
from jupyter_client.blocking.client import BlockingKernelClient

pytestmark = pytest.mark.integration


def needs(module: str) -> None:
    """Skip where `module` is not installed, without importing it here (the engines do)."""
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed")

# The DDP tutorial's own setup() and cleanup(), as users paste them (pytorch.org, "Getting
# started with distributed data parallel"): a fixed port, init and destroy in every cell.
TUTORIAL_CELL = """%%distributed --no-dashboard
import os, torch, torch.distributed as dist, torch.nn as nn, torch.optim as optim
from torch.nn.parallel import DistributedDataParallel as DDP

def setup(rank, world_size):
    os.environ["MASTER_ADDR"] = "localhost"
    os.environ["MASTER_PORT"] = "12355"
    dist.init_process_group("gloo", rank=rank, world_size=world_size)

def cleanup():
    dist.destroy_process_group()

setup(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]))
torch.manual_seed(0)
model = nn.Linear(10, 5)
ddp_model = DDP(model)
optimizer = optim.SGD(ddp_model.parameters(), lr=0.1)
optimizer.zero_grad()
ddp_model(torch.randn(20, 10, generator=torch.Generator().manual_seed(dist.get_rank()))).sum().backward()
optimizer.step()
cleanup()
print("weight", round(float(model.weight.sum()), 6), "initialized", dist.is_initialized())
"""


def one_process_tutorial_weight() -> float:
    """The same step in one process over both ranks' data (the average of their gradients)."""
    import torch

    torch.manual_seed(0)
    model = torch.nn.Linear(10, 5)
    grads = []
    for rank in range(2):
        model.zero_grad()
        model(torch.randn(20, 10, generator=torch.Generator().manual_seed(rank))).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    with torch.no_grad():
        for p, *g in zip(model.parameters(), *grads, strict=True):
            p -= 0.1 * sum(g) / 2
    return round(float(model.weight.detach().sum()), 6)


def test_the_ddp_tutorials_own_init_and_destroy_run_20_times_in_a_row(kc: BlockingKernelClient) -> None:
    expected = one_process_tutorial_weight()
    for cycle in range(20):
        ran = execute(kc, TUTORIAL_CELL)
        assert ran.ok, f"cycle {cycle}: {ran.problem}"
        assert f"weight {expected} initialized True" in ran.stdout, (cycle, ran.stdout)
    # after the script's destroy_process_group, helpers still find the pool's group
    ran = execute(kc, "%%distributed --no-dashboard\nimport torch\nm = nbdist.torch.prepare(torch.nn.Linear(2, 2))\n"
                      "type(m).__name__")
    assert ran.ok and "DistributedDataParallel" in ran.value, ran.problem


def test_init_process_group_that_cannot_be_met_says_why(kc: BlockingKernelClient) -> None:
    ran = execute(kc, "%%distributed --no-dashboard\nimport torch.distributed as dist\ndist.init_process_group('nccl')")
    assert not ran.ok and "'nccl' backend, which needs a GPU" in ran.problem and "backend='gloo'" in ran.problem
    ran = execute(kc, "%%distributed --no-dashboard\nimport torch.distributed as dist\n"
                      "dist.init_process_group('gloo', world_size=4, rank=rank)")
    assert not ran.ok and "world_size=4, but the pool has 2 ranks" in ran.problem
    assert "Engine state is kept" in ran.problem


SCRIPT = '''
import argparse
import torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP


def main(total_epochs: int, save_every: int) -> None:
    dist.init_process_group(backend="gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = DDP(torch.nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for epoch in range(total_epochs):
        x = torch.full((8, 4), float(rank + epoch))
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if epoch % save_every == 0:
            print(f"[GPU{rank}] Epoch {epoch} | saved")
    print("final", rank, round(float(model.module.weight.sum()), 5))
    dist.destroy_process_group()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="simple distributed training job")
    parser.add_argument("total_epochs", type=int)
    parser.add_argument("--save_every", type=int, default=1)
    args = parser.parse_args()
    main(args.total_epochs, args.save_every)
'''


def test_a_script_file_runs_as_main_with_its_arguments(kc: BlockingKernelClient, tmp_path: Path) -> None:
    script = tmp_path / "multigpu_torchrun.py"
    script.write_text(SCRIPT)
    ran = execute(kc, f"%distributed --output all {script} 3 --save_every 2")
    assert ran.ok, ran.problem
    assert "[rank 0] [GPU0] Epoch 0 | saved" in ran.stdout and "[rank 1] [GPU1] Epoch 2 | saved" in ran.stdout
    finals = set(re.findall(r"final \d (-?[\d.]+)", ran.stdout))
    assert len(finals) == 1, ran.stdout  # DDP kept both ranks' parameters equal
    # argparse's own error, and the engines' argv untouched afterwards
    bad = execute(kc, f"%distributed {script} three")
    assert not bad.ok and "invalid int value: 'three'" in bad.problem and "exited with status 2" in bad.problem
    after = execute(kc, f"%%distributed --no-dashboard\nimport sys\n"
                        f"sys.argv[0] == {str(script)!r} or 'three' in sys.argv")
    assert after.ok and after.value == "False"
    missing = execute(kc, "%distributed no_such_script.py")
    assert not missing.ok and "no script 'no_such_script.py'" in missing.problem


LIGHTNING_CELL = """%%distributed --no-dashboard
import torch, lightning as L
from torch.utils.data import DataLoader, TensorDataset

class Regressor(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x), y)
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

torch.manual_seed(0)
data = TensorDataset(torch.randn(64, 4), torch.randn(64, 1))
model = Regressor()
trainer = L.Trainer(accelerator="cpu", devices=2, strategy="STRATEGY", max_epochs=2, logger=False,
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
trainer.fit(model, DataLoader(data, batch_size=8))
weights = model.layer.weight.detach().clone()
(trainer.world_size, trainer.global_step)
"""


@pytest.mark.parametrize("strategy", ["ddp", "ddp_notebook"])
def test_lightning_ddp_trains_across_the_ranks(kc: BlockingKernelClient, strategy: str) -> None:
    needs("lightning")
    ran = execute(kc, LIGHTNING_CELL.replace("STRATEGY", strategy))
    assert ran.ok, ran.problem
    assert ran.value == "(2, 8)"  # 64 samples / batch 8 / 2 ranks = 4 steps per epoch, 2 epochs
    pulled = execute(kc, "%nbdist pull weights --all\nbool((weights[0] == weights[1]).all())")
    assert pulled.ok and pulled.value == "True", pulled.problem


def test_convert_sync_batchnorm_works_on_cpu_ranks_and_pulls_plain(kc: BlockingKernelClient) -> None:
    ran = execute(kc, "%%distributed --no-dashboard\nimport torch, torch.nn as nn\n"
                      "from torch.nn.parallel import DistributedDataParallel as DDP\n"
                      "torch.manual_seed(0)\nnet = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))\n"
                      "net = nn.SyncBatchNorm.convert_sync_batchnorm(net)\nddp = DDP(net)\n"
                      "x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(rank)) + rank\n"
                      "ddp(x).sum().backward()\n"
                      "net[1].running_mean.tolist()")
    assert ran.ok, ran.problem
    import torch

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3)
    bn = torch.nn.BatchNorm2d(4)
    both = torch.cat([torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(r)) + r for r in range(2)])
    bn(conv(both))  # one process over the global batch
    assert [round(v, 4) for v in eval(ran.value)] == [round(v, 4) for v in bn.running_mean.tolist()]
    pulled = execute(kc, "%nbdist pull net\ntype(net[1]).__name__")
    assert pulled.ok and pulled.value == "'BatchNorm2d'", pulled.problem
    direct = execute(kc, "%%distributed --no-dashboard\nimport torch\n"
                         "torch.nn.SyncBatchNorm(2).train()(torch.randn(4, 2))")
    assert not direct.ok and "nbdist.torch.sync_batchnorm(model)" in direct.problem


def test_rank_0s_figures_and_tables_appear_in_the_cell(kc: BlockingKernelClient) -> None:
    ran = execute(kc, "%%distributed --no-dashboard\nimport matplotlib.pyplot as plt\nimport pandas as pd\n"
                      "from IPython.display import display\nplt.plot([1, 2, 3])\nplt.show()\n"
                      "display(pd.DataFrame({'rank': [rank]}))\nplt.figure(); plt.plot([3, 2])\n")
    assert ran.ok, ran.problem
    kinds = [sorted(d["data"]) for d in ran.displays]
    assert kinds.count(["image/png", "text/plain"]) == 2, kinds  # plt.show() and the one left open
    tables = [d["data"]["text/html"] for d in ran.displays if "text/html" in d["data"]]
    assert len(tables) == 1 and "<td>0</td>" in tables[0]  # rank 0's, once
    every = execute(kc, "%%distributed --no-dashboard --output all\nfrom IPython.display import display\n"
                        "display({'text/plain': f'shown by {rank}'}, raw=True)")
    assert every.ok and "[rank 0]" in every.stdout and "[rank 1]" in every.stdout
    assert sorted(d["data"]["text/plain"] for d in every.displays) == ["shown by 0", "shown by 1"]
    updated = execute(kc, "%%distributed --no-dashboard\nfrom IPython.display import display, update_display\n"
                          "display('first', display_id='bar')\nupdate_display('second', display_id='bar')")
    assert [d["kind"] for d in updated.displays] == ["display_data", "update_display_data"]


def test_progress_bars_end_as_their_final_line(kc: BlockingKernelClient) -> None:
    ran = execute(kc, "%%distributed --no-dashboard\nfrom tqdm import tqdm\nimport time\n"
                      "for i in tqdm(range(40), ncols=60):\n    time.sleep(0.01)\nprint('done')")
    assert ran.ok, ran.problem
    lines = [line for line in screen(ran.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("100%") and "40/40" in lines[0], ran.stderr
    grouped = execute(kc, "%%distributed --no-dashboard --output all\nimport sys, time\n"
                          "for i in range(1, 6):\n    print(f'\\rstep {i}/5', end='', flush=True); time.sleep(0.05)\n"
                          "print()")
    assert grouped.ok and grouped.stdout.count("step 5/5") == 2 and "step 4/5" not in grouped.stdout


def test_a_rich_bar_leaves_the_next_cell_responsive(kc: BlockingKernelClient) -> None:
    ran = execute(kc, "%%distributed --no-dashboard\nfrom rich.progress import track\nimport time\n"
                      "for i in track(range(400), description='training'):\n    time.sleep(0.004)\n"
                      "print('rich done')")
    assert ran.ok and "rich done" in ran.stdout, ran.problem
    assert "100%" in screen(ran.stdout)
    started = time.monotonic()
    after = execute(kc, "%%distributed --no-dashboard\nprint('next')")
    assert after.ok and after.stdout == "next\n" and time.monotonic() - started < 1.0


def test_a_last_value_that_must_not_be_pickled_is_shown_by_its_repr(kc: BlockingKernelClient) -> None:
    # a value whose pickling would block (as a Keras History starts a collective) is never pickled
    ran = execute(kc, "%%distributed --no-dashboard\nimport threading\nclass Blocks:\n"
                      "    def __reduce__(self):\n        threading.Event().wait()\n"
                      "    def __repr__(self):\n        return '<Blocks on rank %d>' % rank\nBlocks()")
    assert ran.ok and ran.value == "<Blocks on rank 0>" and ran.seconds < 10, ran.problem
    plain = execute(kc, "%%distributed --no-dashboard\n{'loss': [0.5, 0.25], 'rank': rank}")
    assert plain.ok and plain.value == "{'loss': [0.5, 0.25], 'rank': 0}"


def test_a_fork_inside_an_engine_ends_with_the_pool() -> None:
    code = textwrap.dedent("""
        import nbdist, time
        with nbdist.Pool(2, gpus="none") as pool:
            pool.run("import multiprocessing, time, os\\n"
                     "ctx = multiprocessing.get_context('fork')\\n"
                     "child = ctx.Process(target=time.sleep, args=(600,)); child.start()\\n"
                     "print('CHILD', child.pid, flush=True)", output="all")
        print('STOPPED', flush=True)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
    children = [int(pid) for pid in re.findall(r"CHILD (\d+)", out.stdout)]
    assert len(children) == 2 and "STOPPED" in out.stdout, out.stdout + out.stderr
    deadline = time.monotonic() + 10
    while any(psutil.pid_exists(p) for p in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in children if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]


KERAS_CELL = """%%distributed --backend tensorflow --no-dashboard
import numpy as np
x = np.random.default_rng(0).random((64, 4), dtype="float32")
y = x.sum(axis=1, keepdims=True)
with strategy.scope():
    model = tf.keras.Sequential([tf.keras.layers.Dense(1, input_shape=(4,))])
    model.compile(optimizer="sgd", loss="mse", metrics=["mae"])
model.fit(x, y, epochs=2, batch_size=8)
"""


def test_keras_fit_as_the_last_line_shows_its_history_and_progress(kc: BlockingKernelClient) -> None:
    needs("tensorflow")
    warm = execute(kc, "%%distributed --backend tensorflow --restart --no-dashboard\nimport tensorflow as tf")
    assert warm.ok, warm.problem
    assert "oneDNN" not in warm.stderr and "cuInit" not in warm.stderr  # TensorFlow's start-up noise stays out
    ran = execute(kc, KERAS_CELL)
    assert ran.ok, ran.problem
    assert re.match(r"<tf_keras\.src\.callbacks\.History (object )?at 0x", ran.value) and ran.seconds < 60
    lines = [line for line in screen(ran.stdout).splitlines() if line.strip()]
    assert lines[0] == "Epoch 1/2" and lines[2] == "Epoch 2/2", lines
    assert re.fullmatch(r"8/8 \[=+\] - .*loss: [\d.e+-]+ - mae: [\d.e+-]+", lines[1]), lines[1]


def test_the_parameter_server_strategy_has_its_cluster_resolver(kc: BlockingKernelClient) -> None:
    needs("tensorflow")
    ran = execute(kc, "%%distributed --backend tensorflow --strategy ps --restart --no-dashboard\n"
                      "resolver = strategy.cluster_resolver\n"
                      "(resolver.task_type, sorted(resolver.cluster_spec().as_dict()))")
    assert ran.ok, ran.problem
    assert ran.value == "('chief', ['chief', 'ps', 'worker'])"
