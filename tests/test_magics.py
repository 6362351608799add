"""The magics through a real IPython shell, as a user sees them."""

from __future__ import annotations

import pytest
from IPython.core.interactiveshell import InteractiveShell

from nbdist.kernel._magics import NbdistMagics

pytestmark = pytest.mark.integration


def run(shell: InteractiveShell, cell: str) -> object:
    result = shell.run_cell(cell)
    return result


def test_cell_output_and_last_expression(shell: InteractiveShell, magics: NbdistMagics,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    result = run(shell, "%%distributed\nprint('hello from rank', rank)\nworld_size * 21")
    assert result.success and result.result == 42
    out = capsys.readouterr().out
    assert "hello from rank 0" in out and "hello from rank 1" not in out
    assert "Out[" in out and "42" in out


def test_output_all_prefixes_every_rank(shell: InteractiveShell, magics: NbdistMagics,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    result = run(shell, "%%distributed --output all\nprint('line', rank)\nprint('two')")
    assert result.success
    out = capsys.readouterr().out
    for r in (0, 1):
        assert f"[rank {r}] line {r}\n" in out and f"[rank {r}] two\n" in out


def test_push_pull_status_through_magics(shell: InteractiveShell, magics: NbdistMagics,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    shell.user_ns["lr"] = 0.125
    assert run(shell, "%nbdist push lr").success
    assert run(shell, "%%distributed\nscaled = lr * (rank + 1)").success
    assert run(shell, "%nbdist pull scaled --rank 1").success
    assert shell.user_ns["scaled"] == 0.25
    capsys.readouterr()
    status = run(shell, "%nbdist status").result
    # torch is formed, so the per-rank model-state columns show; no model yet: nothing held
    assert list(status.columns) == ["engine", "host", "pid", "device", "state", "param_mb", "grad_mb", "optim_mb"]
    assert list(status.index) == [0, 1] and set(status.state) == {"idle"}
    assert status.param_mb.tolist() == [0.0, 0.0]


def test_traceback_points_at_the_cell_line(shell: InteractiveShell, magics: NbdistMagics,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    result = run(shell, "%%distributed\nx = 1\nif rank == 1:\n    raise ValueError('bad batch')\n")
    assert not result.success
    err = capsys.readouterr()
    text = err.out + err.err
    assert "---- rank 1 ----" in text
    assert '<distributed cell' in text and "line 4" in text and "raise ValueError('bad batch')" in text
    assert "ValueError on rank 1: bad batch" in text
    assert "nbdist/engine.py" not in text
    # The failure left the pool usable, state included.
    assert run(shell, "%%distributed\nx + rank").result == 1


@pytest.mark.parametrize(
    ("cell", "fragment"),
    [
        ("%nbdist start -n 2", "already running"),
        ("%nbdist start -n zero", "not a whole number"),
        ("%nbdist start --gpus 0,a", "a list like '0,1'. See `%nbdist start -h`."),
        ("%nbdist launch", "invalid choice"),
        ("%nbdist pull nothing_here", "nothing_here"),
        ("%nbdist pull x --rank 5", "out of range"),
        ("%nbdist push not_in_notebook", "not defined in the notebook"),
        ("%%distributed --backend jax\n1", "invalid choice"),
        ("%%distributed --strategy zero\n1", "choose one of"),
        ("%%distributed --output some\n1", "invalid choice"),
        ("%%distributed --timeout -3\n1", "positive number of seconds"),
        ("%%distributed --timeout 'unclosed\n1", "cannot read the options"),
        ("%%distributed --retries -1\n1", "--retries: '-1'"),
        ("%%distributed --retries-on crash\n1", "invalid choice"),
        ("%distributed", "the following arguments are required: script"),
    ],
)
def test_bad_options_get_one_line_messages(shell: InteractiveShell, magics: NbdistMagics,
                                           capsys: pytest.CaptureFixture[str], cell: str,
                                           fragment: str) -> None:
    capsys.readouterr()
    result = run(shell, cell)
    assert not result.success
    text = "".join(capsys.readouterr())
    assert "UsageError" in text and fragment in text
    assert "Traceback" not in text and ".. See" not in text


def test_a_pool_far_beyond_the_machine_is_refused_at_once(shell: InteractiveShell,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    import time

    magics = shell.magics_manager.registry["NbdistMagics"]
    magics.pool = None
    capsys.readouterr()
    started = time.monotonic()
    assert not run(shell, "%nbdist start -n 10000").success
    assert time.monotonic() - started < 5
    text = "".join(capsys.readouterr())
    assert "UsageError: -n 10000: 10000 engines need about" in text and "start at most" in text
    assert magics.pool is None


def test_no_pool_messages(shell: InteractiveShell, capsys: pytest.CaptureFixture[str]) -> None:
    magics = shell.magics_manager.registry["NbdistMagics"]
    magics.pool = None
    for cell in ("%%distributed\n1", "%nbdist status", "%nbdist stop"):
        capsys.readouterr()
        assert not run(shell, cell).success
        assert "no pool is running: start one with `%nbdist start -n 2`" in "".join(capsys.readouterr())


def test_a_trailing_comment_is_not_an_option(shell: InteractiveShell, magics: NbdistMagics) -> None:
    status = run(shell, "%nbdist status   # which engines are there?").result
    assert list(status.index) == [0, 1]
