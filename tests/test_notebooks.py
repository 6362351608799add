"""The saved tutorial notebooks carry their outputs, the dashboard's picture included.

(nbval re-executes every notebook in `notebooks/` as part of the same pytest run.)
"""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_saved_notebook_has_outputs_and_dashboard_png(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.get("execution_count") for c in code), "save the notebook executed"
    outputs = [o for c in code for o in c.get("outputs", [])]
    expected = [c for c in code if "raises-exception" in c.metadata.get("tags", [])]  # nbval's tag
    assert not [o for c in code if c not in expected for o in c.get("outputs", []) if o.output_type == "error"]
    assert all(any(o.output_type == "error" for o in c.get("outputs", [])) for c in expected)
    assert any("image/png" in o.get("data", {}) for o in outputs), "the dashboard's PNG is missing"
    assert not any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in outputs), (
        "a live widget was left in the saved output (it shows as an error on GitHub)"
    )


def test_there_is_a_quickstart() -> None:
    assert any(p.name == "01_quickstart.ipynb" for p in NOTEBOOKS)
