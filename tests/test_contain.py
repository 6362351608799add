"""Failure containment against the runner's contract, with fake engines and fake async results:
when the engines are replaced, and what the user is told (the real-pool tests are in
test_failures.py)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

import pytest

from nbdist import DistributedCellError
from nbdist._wire import CellOutcome
from nbdist.cluster import EngineExit
from nbdist.kernel._contain import gather_or_fail
from nbdist.kernel._runner import CellRunner


class FakeResult(Future[Any]):
    """What ipyparallel's AsyncResult offers the runner: a future with streamed metadata."""

    def __init__(self) -> None:
        super().__init__()
        self.metadata: dict[str, Any] = {"stdout": "", "stderr": "", "data": {}}

    def wait_for_output(self, timeout: float = 0) -> None:
        pass


class FakeView:
    def __init__(self, rank: int, behave: Callable[[int, FakeResult], None]) -> None:
        self.rank, self.behave = rank, behave

    def apply_async(self, func: Any, *args: Any) -> FakeResult:
        result = FakeResult()
        self.behave(self.rank, result)
        return result


class FakeRanks:
    def __init__(self, behave: Callable[[int, FakeResult], None], n: int = 2, dead: Sequence[EngineExit] = ()):
        self.views = [FakeView(r, behave) for r in range(n)]
        self.grace = 0.2
        self.dead = list(dead)
        self.recovered = 0
        self.interrupted: list[int] = []
        self.running = True

    def dump_stacks(self, ranks: Sequence[int]) -> None:
        pass  # no dump arrives: the rank's stack cannot be read

    def exits(self) -> list[EngineExit]:
        return list(self.dead)

    def interrupt(self, ranks: Sequence[int]) -> None:
        self.interrupted.extend(ranks)

    def recover(self) -> float:
        self.recovered += 1
        self.dead = []
        return 0.5


def _run(ranks: FakeRanks, timeout: float | None = None) -> Any:
    return CellRunner(ranks).run("x", cell_id="1", backend="torch", strategy="ddp", timeout=timeout)


def _raises(name: str) -> Callable[[int, FakeResult], None]:
    def behave(rank: int, result: FakeResult) -> None:
        if rank == 1:
            result.set_result(CellOutcome(rank, ok=False, ename=name, evalue="bad", traceback=f"{name}: bad"))
    return behave  # rank 0 never answers: it waits in a collective for rank 1


def test_a_raising_rank_with_another_stuck_replaces_the_engines_once() -> None:
    ranks = FakeRanks(_raises("ValueError"))
    with pytest.raises(DistributedCellError) as info:
        _run(ranks)
    assert ranks.recovered == 1 and info.value.lost_state
    assert "ValueError on rank 1: bad" in info.value.summary
    assert "rank 0 (its stack could not be read): waiting for the failed rank, it was stopped." in info.value.summary
    assert "(recovered in 0.5 s)" in info.value.summary


def test_ranks_that_all_finished_keep_their_state() -> None:
    def behave(rank: int, result: FakeResult) -> None:
        result.set_result(CellOutcome(rank, ok=rank == 0, ename="" if rank == 0 else "KeyError", evalue="k",
                                      traceback="KeyError: k"))
    ranks = FakeRanks(behave)
    with pytest.raises(DistributedCellError) as info:
        _run(ranks)
    assert ranks.recovered == 0 and not info.value.lost_state
    assert info.value.summary.endswith("Engine state is kept: the pool is ready for the next cell.")


def test_a_dead_engine_is_reported_by_rank_and_replaced() -> None:
    ranks = FakeRanks(lambda rank, result: None, dead=[EngineExit(1, "h", 42, -9)])
    with pytest.raises(DistributedCellError) as info:
        _run(ranks)
    assert ranks.recovered == 1 and info.value.lost_state
    assert "EngineDied: rank 1 (engine pid 42 on h) was killed by SIGKILL." in info.value.summary


def test_a_timeout_interrupts_and_replaces_only_ranks_that_cannot_stop() -> None:
    ranks = FakeRanks(lambda rank, result: None)
    with pytest.raises(DistributedCellError) as info:
        _run(ranks, timeout=0.1)
    assert ranks.interrupted == [0, 1] and ranks.recovered == 1
    assert info.value.summary.startswith("The cell timed out after 0.1 s. Where the ranks were: rank 0 (its stack")
    assert "Ranks 0, 1 did not stop (blocked in a collective) and were killed." in info.value.summary

    def stops(rank: int, result: FakeResult) -> None:
        ranks2.pending.append((rank, result))
    ranks2 = FakeRanks(stops)
    ranks2.pending = []  # type: ignore[attr-defined]
    ranks2.interrupt = lambda rs: [r.set_result(CellOutcome(k, ok=False, interrupted=True))  # type: ignore[method-assign]
                                   for k, r in ranks2.pending]  # type: ignore[attr-defined]
    with pytest.raises(DistributedCellError) as info:
        _run(ranks2, timeout=0.1)
    assert ranks2.recovered == 0 and not info.value.lost_state
    assert "Every rank stopped; engine state is kept" in info.value.summary


def test_a_setup_call_that_hangs_on_one_rank_frees_the_pool() -> None:
    ranks = FakeRanks(lambda rank, result: None)
    pending = [FakeResult(), FakeResult()]
    pending[0].set_result(1)
    # On a loaded machine the wait is stretched, and the message says so.
    within = r"choosing ports did not finish within (0.1 s|[\d.]+ s \(0.1 s asked, stretched for this machine's load\))"
    with pytest.raises(DistributedCellError, match=within) as info:
        gather_or_fail(ranks, pending, what="choosing ports", timeout=0.1)
    assert ranks.recovered == 1 and info.value.lost_state
    ok = [FakeResult(), FakeResult()]
    for f in ok:
        f.set_result(7)
    assert gather_or_fail(ranks, ok, what="x", timeout=1) == [7, 7] and ranks.recovered == 1


def test_grouped_output_waits_for_a_finished_ranks_late_lines(capsys: pytest.CaptureFixture[str]) -> None:
    """A request can be done before its last output arrives: until the cell ends, a rank's
    silence is not taken for the end of its output."""
    from nbdist.cluster import Outputs
    from nbdist.kernel._output import OutputStream

    first, second = FakeResult(), FakeResult()
    printed = [Outputs(), Outputs()]
    stream = OutputStream([first, second], "grouped", outputs=printed)
    printed[0].stdout.append("epoch starts\nmine is 0\n")
    first.set_result(None)
    second.set_result(None)  # done, its output still on the way
    stream.pump()
    assert capsys.readouterr().out == ""
    printed[1].stdout.extend(["epoch starts\nmine", " is 1\n"])
    stream.pump()
    stream.pump(final=True)
    assert capsys.readouterr().out == "[all ranks] epoch starts\n[rank 0] mine is 0\n[rank 1] mine is 1\n"
