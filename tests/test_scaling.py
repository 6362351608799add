"""The scaling report runs the same cell at 1 and 2 engines and compares samples/s."""

from __future__ import annotations

import pytest

import nbdist

pytestmark = pytest.mark.integration

CELL = """
import torch
from torch import nn
model = nbdist.torch.prepare(nn.Linear(32, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.01)
for step in range(200):
    x = torch.randn(64, 32)
    loss = model(x).pow(2).mean()
    opt.zero_grad(); loss.backward(); opt.step()
    nbdist.report(step=step, loss=loss.item(), samples=len(x))
"""


def test_scaling_report_compares_one_and_two_engines() -> None:
    report = nbdist.scaling_report(CELL, engines=(1, 2))
    table = report.table
    assert table.engines.tolist() == [1, 2]
    assert table.samples.tolist() == [200 * 64, 2 * 200 * 64]  # every report of every rank counted
    assert table.speedup.iloc[0] == 1.0 and table.speedup.iloc[1] > 0
    assert table.efficiency.iloc[1] == pytest.approx(table.speedup.iloc[1] / 2)
    assert set(report.losses) == {1, 2} and len(report.losses[2]) == 200
    assert report._repr_png_().startswith(b"\x89PNG")


def test_scaling_report_rejects_bad_engine_counts() -> None:
    with pytest.raises(nbdist.ConfigError):
        nbdist.scaling_report(CELL, engines=(0, 2))
