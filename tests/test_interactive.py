"""Interactive work with the ranks through a real kernel (jupyter_client, as a notebook runs it)
on a real 2-engine pool: rank subsets, auto mode, completion, grouped output, the debugger."""

from __future__ import annotations

import pytest
from _kernel import execute
from jupyter_client.blocking.client import BlockingKernelClient

pytestmark = pytest.mark.integration


def test_a_cell_runs_on_the_named_ranks_only(kc: BlockingKernelClient) -> None:
    ran = execute(kc, "%%distributed --ranks 1 --output all --no-dashboard\nmarked = rank\nprint('on', rank)\nrank")
    assert ran.ok, ran.error
    assert "[rank 1] on 1" in ran.stdout and "[rank 0]" not in ran.stdout
    assert ran.value == "1"  # the first named rank gives the value
    assert execute(kc, "%nbdist pull marked --rank 1").ok
    missing = execute(kc, "%nbdist pull marked --rank 0")
    assert not missing.ok and "marked" in missing.problem  # rank 0 never ran it
    bad = execute(kc, "%%distributed --ranks 0-5\n1")
    assert not bad.ok and "this pool's ranks are 0..1" in bad.problem


def test_a_collective_in_a_rank_subset_cell_fails_within_seconds(kc: BlockingKernelClient) -> None:
    execute(kc, "%%distributed --no-dashboard\nkept = 3")
    ran = execute(kc, "%%distributed --ranks 0 --no-dashboard\nimport torch, torch.distributed as dist\n"
                      "dist.all_reduce(torch.ones(1))")
    assert not ran.ok and ran.seconds < 10
    assert "all_reduce is a collective: in a cell that runs on rank 0 only, it would wait forever" in ran.problem
    assert execute(kc, "%%distributed --no-dashboard\nassert kept == 3").ok  # nothing was lost
    # A collective reached another way (not through torch.distributed's names) is found in the
    # rank's stack: the engines are replaced, and the message says why.
    ran = execute(kc, "%%distributed --ranks 0 --no-dashboard\nimport torch\n"
                      "from torch.distributed import distributed_c10d as c10d\nc10d.all_reduce(torch.ones(1))")
    assert not ran.ok and ran.seconds < 20
    assert "rank 0 was in all_reduce at cell line 4: a collective in a cell that runs on rank 0 only" in ran.problem


def test_auto_mode_runs_plain_cells_on_every_rank(kc: BlockingKernelClient) -> None:
    on = execute(kc, "%nbdist auto on --no-dashboard --output all")
    assert on.ok and "auto mode on" in on.stdout
    ran = execute(kc, "print('auto', rank)")
    assert ran.ok and "[rank 0] auto 0" in ran.stdout and "[rank 1] auto 1" in ran.stdout
    assert "[nbdist auto]" in ran.stderr  # the marker that this cell ran on the engines
    assert "auto mode is on: %%distributed --no-dashboard --output all" in execute(kc, "%nbdist auto").stdout
    assert execute(kc, "%nbdist auto off").ok
    here = execute(kc, "import os\nprint('kernel', os.getpid())")
    assert here.ok and "[rank" not in here.stdout and "kernel" in here.stdout


def test_completion_offers_engine_only_names_and_attributes(kc: BlockingKernelClient) -> None:
    assert execute(kc, "%%distributed --no-dashboard\nclass EngineOnly:\n    special_attribute = 1\n"
                       "engine_thing = EngineOnly()").ok
    reply = kc.complete("engine_thing.spe", 16, reply=True, timeout=10)
    assert "engine_thing.special_attribute" in reply["content"]["matches"]
    reply = kc.complete("engine_th", 9, reply=True, timeout=10)
    assert "engine_thing" in reply["content"]["matches"]
    assert "engine_thing" not in execute(kc, "print(sorted(globals()))").stdout  # nothing was pulled


def test_grouped_output_shows_identical_lines_once(kc: BlockingKernelClient) -> None:
    ran = execute(kc, "%%distributed --output grouped --no-dashboard\nprint('same')\nprint('rank is', rank)\n"
                      "print('end')")
    assert ran.ok
    assert ran.stdout.count("same") == 1 and "[all ranks] same" in ran.stdout
    assert "[rank 0] rank is 0" in ran.stdout and "[rank 1] rank is 1" in ran.stdout
    assert "[all ranks] end" in ran.stdout
    failed = execute(kc, "%%distributed --no-dashboard\nraise ValueError('on both')")
    assert "ValueError on ranks 0, 1: on both" in failed.problem
    assert "---- ranks 0, 1 (the same error) ----" in failed.problem and failed.problem.count("Traceback") == 1


def test_pull_and_push_several_names_and_every_rank(kc: BlockingKernelClient) -> None:
    assert execute(kc, "a, b = 1, 2\n%nbdist push a b").ok
    assert execute(kc, "%%distributed --no-dashboard\nc = a + b + rank").ok
    ran = execute(kc, "%nbdist pull c a --all\nprint(c, a)")
    assert ran.ok and "[3, 4] [1, 1]" in ran.stdout


def test_post_mortem_debugger_on_the_failing_rank(kc: BlockingKernelClient) -> None:
    failed = execute(kc, "%%distributed --no-dashboard\nif rank == 1:\n    secret = 40 + rank + 1\n"
                         "    raise KeyError('look here')")
    assert not failed.ok
    ran = execute(kc, "%nbdist debug", answers=["p secret", "p rank", "q"])
    assert ran.ok, ran.error
    assert ran.prompts[0].startswith("[rank 1] (Pdb)") and len(ran.prompts) == 3
    assert "42" in ran.stdout and "raise KeyError('look here')" in ran.stdout


def test_breakpoint_stops_rank_0_and_continues_or_quits(kc: BlockingKernelClient) -> None:
    ran = execute(kc, "%%distributed --no-dashboard\nimport torch.distributed as dist\nx_local = 5 * (rank + 1)\n"
                      "nbdist.breakpoint()\ny = x_local + 1\ndist.barrier()\ny",
                  answers=["p x_local", "c"])
    assert ran.ok, ran.error
    assert ran.prompts and ran.prompts[0].startswith("[rank 0] (Pdb)") and "5" in ran.stdout
    assert ran.value == "6"
    quit_ = execute(kc, "%%distributed --no-dashboard\nimport torch.distributed as dist\nnbdist.breakpoint()\n"
                        "dist.barrier()", answers=["q"])
    assert not quit_.ok and quit_.seconds < 30  # q ends the cell; the other rank is not left hanging
    assert execute(kc, "%%distributed --no-dashboard\nrank").ok
