"""Random option strings fed to the magics: always a clean one-line error, never a hang,
and the pool still answers afterwards."""

from __future__ import annotations

import random

import pytest
from IPython.core.interactiveshell import InteractiveShell

from nbdist.kernel._magics import NbdistMagics

pytestmark = pytest.mark.integration

WORDS = ["-n", "--gpus", "--timeout", "--rank", "--backend", "--strategy", "--output", "-h2", "start",
         "status", "push", "pull", "0", "-1", "2.5", "nan", "inf", "all", "none", "0,0", "x", "'", '"',
         "--", "torch", "ddp", "rank0", "—", "💥", "1e9", "--no-dashboard", "=", "--timeout=-1"]


@pytest.mark.parametrize("seed", range(3))
def test_random_options_fail_cleanly(shell: InteractiveShell, magics: NbdistMagics,
                                     capsys: pytest.CaptureFixture[str], seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(40):
        line = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4)))
        if rng.random() < 0.5:
            cell = f"%%distributed {line}\n1"
        else:
            cell = f"%nbdist {line}"
        capsys.readouterr()
        result = shell.run_cell(cell)
        text = "".join(capsys.readouterr())
        if not result.success:
            assert "Traceback" not in text, (cell, text)
            assert isinstance(result.error_in_exec, Exception)
    capsys.readouterr()
    assert magics.pool is not None and magics.pool.is_running
    assert shell.run_cell("%%distributed --no-dashboard\nworld_size").result == 2
