"""Every tutorial notebook follows the project's structure and is committed without outputs."""
from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("[0-9][0-9]_*.ipynb"))
REQUIRED_SECTIONS = ("objectives", "use your own", "exercise")


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_structure(notebook):
    nb = nbformat.read(notebook, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, "no code cells"
    assert "parameters" in code[0].metadata.get("tags", []), "first code cell must be tagged 'parameters'"
    text = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown").lower()
    for section in REQUIRED_SECTIONS:
        assert section in text, f"missing a section about {section!r}"
    assert isinstance(nb.metadata.get("tomoml", {}).get("smoke_parameters"), dict)


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_committed_without_outputs(notebook):
    nb = nbformat.read(notebook, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code" and "nbval-check" not in cell.metadata.get("tags", []):
            assert not cell.get("outputs"), f"cell with outputs: {cell.source[:60]!r}"
            assert cell.get("execution_count") is None
