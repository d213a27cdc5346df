"""Execute every notebook in notebooks/ end to end at smoke size, with papermill.

A notebook declares its smoke parameters in its metadata, under
``metadata["tomoml"]["smoke_parameters"]``; a new notebook is picked up by the glob
below without editing this file.
"""
from __future__ import annotations

import re
import time
from pathlib import Path

import nbformat
import pytest

from tomoml_nb.report import run_report

NOTEBOOKS = sorted((Path(__file__).resolve().parents[2] / "notebooks").glob("[0-9][0-9]_*.ipynb"))


@pytest.mark.notebook
@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_at_smoke_size(notebook, tmp_path):
    nb = nbformat.read(notebook, as_version=4)
    smoke = nb.metadata.get("tomoml", {}).get("smoke_parameters", {})
    start = time.perf_counter()
    report = run_report(notebook, smoke, tmp_path, progress=False, timeout=600)
    elapsed = time.perf_counter() - start
    assert report.ok, report.error
    executed = nbformat.read(report.notebook, as_version=4)
    errors = [o for c in executed.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors
    html = report.html.read_text()
    remote = re.findall(r"""<(?:script|link|img|iframe)[^>]*(?:src|href)=["']https?://[^"']*""", html)
    assert not remote, f"the report loads from the network: {remote[:3]}"
    print(f"{notebook.name}: {elapsed:.1f} s at smoke size")


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 2
