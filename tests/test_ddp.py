"""DDP on a real 2-engine gloo pool, checked against single-process training."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import nbdist

pytestmark = pytest.mark.integration

# Shared by the engines and the single-process reference: the same data, model and steps.
SETUP = """
import torch
from torch import nn

def make_data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=g)
    y = x @ torch.randn(8, 1, generator=g) + 0.1 * torch.randn(256, 1, generator=g)
    return torch.utils.data.TensorDataset(x, y)

def make_model():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
"""

TRAIN = """
model = nbdist.torch.prepare(make_model())
loader = nbdist.torch.loader(make_data(), batch_size=16, shuffle=False)
opt = torch.optim.SGD(model.parameters(), lr=0.05)
for epoch in range(2):
    for x, y in loader:
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
flat = torch.cat([p.detach().flatten() for p in model.parameters()])
"""


def reference_parameters() -> list[float]:
    """One process, global batch of 32 = rank 0's 16 rows + rank 1's 16 rows (the
    DistributedSampler without shuffling deals rows round-robin)."""
    ns: dict[str, object] = {}
    exec(SETUP, ns)
    import torch
    from torch import nn

    data = ns["make_data"]()  # type: ignore[operator]
    model = ns["make_model"]()  # type: ignore[operator]
    x_all, y_all = data.tensors
    idx = {r: list(range(r, len(x_all), 2)) for r in (0, 1)}
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(2):
        for b in range(len(idx[0]) // 16):
            rows = idx[0][b * 16:(b + 1) * 16] + idx[1][b * 16:(b + 1) * 16]
            opt.zero_grad()
            nn.functional.mse_loss(model(x_all[rows]), y_all[rows]).backward()
            opt.step()
    return torch.cat([p.detach().flatten() for p in model.parameters()]).tolist()


def test_ddp_matches_single_process_training(pool: nbdist.Pool) -> None:
    pool.run(SETUP)
    pool.run(TRAIN)
    rank0 = pool.pull("flat", rank=0).tolist()
    rank1 = pool.pull("flat", rank=1).tolist()
    assert rank0 == rank1, "DDP ranks disagree"
    expected = reference_parameters()
    assert max(abs(a - b) for a, b in zip(rank0, expected, strict=False)) < 1e-5


def test_cell_namespace_is_torchrun_compatible(pool: nbdist.Pool) -> None:
    code = (
        "import os, torch\n"
        "(rank, local_rank, world_size, str(device), os.environ['RANK'], os.environ['LOCAL_RANK'],\n"
        " os.environ['WORLD_SIZE'], os.environ['MASTER_ADDR'], torch.get_num_threads(),\n"
        " torch.distributed.get_backend())"
    )
    assert pool.run(code).value == (0, 0, 2, "cpu", "0", "0", "2", "127.0.0.1",
                                    pool.config.threads_per_engine, "gloo")
    ranks = pool.run("import torch.distributed as dist\nt = torch.tensor([float(rank)])\n"
                     "dist.all_reduce(t)\nt.item()")
    assert ranks.value == 1.0


def test_cells_compute_on_their_ranks_own_cores(pool: nbdist.Pool) -> None:
    """Pipeline and tensor-parallel cells: every thread of a rank (gloo's included) on the
    rank's block of cores. DDP cells: the compute thread there, gloo's threads on any core."""
    import os

    cores = frozenset(os.sched_getaffinity(0))
    threads = pool.config.threads_per_engine
    if threads * 2 > len(cores):
        pytest.skip("fewer cores than engines: engines are left unpinned")
    read = "import os\n_cpus = {frozenset(os.sched_getaffinity(int(t))) for t in os.listdir('/proc/self/task')}"
    pool.run("import torch.distributed as dist\ndist.barrier()")  # the group (and its threads) exist
    for strategy in ("pipeline", "tensor"):
        pool.run(read, strategy=strategy)
        blocks = [pool.pull("_cpus", rank=r) for r in (0, 1)]
        assert all(len(b) == 1 for b in blocks), blocks  # one block for all of a rank's threads
        ordered = sorted(cores)
        assert [next(iter(b)) for b in blocks] == [frozenset(ordered[:threads]),
                                                   frozenset(ordered[threads:2 * threads])]
    # DDP: the compute (main) thread on the rank's block, gloo's threads free to overlap on any core.
    pool.run(read + "\nimport threading\n_main = (threading.get_native_id() == threading.main_thread().native_id,"
             " frozenset(os.sched_getaffinity(0)))", strategy="ddp")
    for r in (0, 1):
        assert pool.pull("_main", rank=r) == (True, frozenset(sorted(cores)[r * threads:(r + 1) * threads]))
        assert cores in pool.pull("_cpus", rank=r)


def test_a_value_that_cannot_travel_is_shown_by_its_display(pool: nbdist.Pool) -> None:
    """A generator cannot be pickled; sys.flags pickles but cannot be loaded back (ipyparallel's
    client then dropped the reply and the cell never ended)."""
    for source, text in (("(i for i in range(3))", "<generator object"), ("import sys\nsys.flags", "sys.flags(")):
        value = pool.run(source, timeout=60).value
        assert text in repr(value)


def test_process_group_is_kept_between_cells(pool: nbdist.Pool) -> None:
    pool.run("import torch.distributed as dist\n_pg_first = id(dist.group.WORLD)")
    assert pool.run("id(dist.group.WORLD) == _pg_first").value is True


def test_state_persists_push_and_pull(pool: nbdist.Pool) -> None:
    pool.run("counter = rank * 10")
    pool.run("counter += 1")
    assert pool.pull("counter") == 1
    assert pool.pull("counter", rank=1) == 11
    pool.push({"greeting": "hi"})
    assert [pool.pull("greeting", rank=r) for r in (0, 1)] == ["hi", "hi"]


def test_pulled_model_is_unwrapped_and_usable(pool: nbdist.Pool) -> None:
    pool.run(SETUP)
    pool.run("model = nbdist.torch.prepare(make_model())")
    model = pool.pull("model")
    import torch

    assert not isinstance(model, torch.nn.parallel.DistributedDataParallel)
    assert model(torch.zeros(3, 8)).shape == (3, 1)


def _kernel_side_modules() -> list[str]:
    """Every module the notebook kernel may import: the kernel and cluster packages, the
    shared private modules, the engine package (its functions travel by reference), and the
    backends' registries and strategy files; not the `_` modules of a backend (engines only)."""
    import pkgutil

    root = Path(nbdist.__file__).parent
    names = ["nbdist"]
    for info in pkgutil.walk_packages([str(root)], prefix="nbdist."):
        parts = info.name.split(".")
        if parts[1] in ("torch", "keras", "checkpoint"):
            continue  # cell helpers, imported on engines
        if parts[1] == "backends" and len(parts) == 4 and parts[3].startswith("_"):
            continue  # a backend's framework-importing modules
        names.append(info.name)
    return names


def test_importing_nbdist_imports_no_framework() -> None:
    modules = _kernel_side_modules()
    assert {"nbdist.kernel._magics", "nbdist.cluster._cluster", "nbdist.backends.torch.fsdp",
            "nbdist.backends.tensorflow.ps", "nbdist.engine._cell"} <= set(modules)
    code = (
        f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\n"
        "print(sorted(m for m in ('torch', 'tensorflow', 'keras', 'tf_keras') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_no_import_cycle_between_modules() -> None:
    """Imports inside nbdist form no cycle, counting those inside functions too (only
    `if TYPE_CHECKING:` blocks are left out: they never run)."""
    import ast

    root = Path(nbdist.__file__).parent
    graph: dict[str, set[str]] = {}
    for path in root.rglob("*.py"):
        rel = path.relative_to(root.parent).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        deps: set[str] = set()
        tree = ast.parse(path.read_text())
        for block in [n for n in ast.walk(tree) if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test)]:
            block.body = []
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("nbdist"):
                deps.add(node.module)
                deps.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("nbdist"))
        graph[name] = deps
    # A module's own packages are already being imported when it runs: not a cycle.
    graph = {m: {d for d in deps if d in graph and d != m and not m.startswith(d + ".")}
             for m, deps in graph.items()}

    def parents(name: str) -> list[str]:  # importing a.b.c runs a/__init__ and a.b/__init__ first
        parts = name.split(".")
        return [".".join(parts[:i]) for i in range(1, len(parts))]

    for m in graph:
        graph[m] |= {p for d in graph[m] for p in parents(d) if p in graph and p != m and not m.startswith(p + ".")}
    seen: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        if seen.get(m) == 1:
            raise AssertionError(f"import cycle: {' -> '.join(path[path.index(m):] + [m])}")
        if seen.get(m) == 2:
            return
        seen[m] = 1
        for d in sorted(graph[m]):
            visit(d, path + [m])
        seen[m] = 2

    for m in sorted(graph):
        visit(m, [])


def test_no_module_is_over_400_lines() -> None:
    root = Path(nbdist.__file__).parent
    long = {str(p.relative_to(root)): n for p in root.rglob("*.py") if (n := len(p.read_text().splitlines())) > 400}
    assert long == {}
