"""Execute every notebook in notebooks/ end to end at smoke size, with papermill.

A notebook declares its smoke parameters in its metadata, under
``metadata["tomoml"]["smoke_parameters"]``; a new notebook is picked up by the glob
below without editing this file. A notebook whose "use your own data" section reads a file
also declares ``metadata["tomoml"]["own_data_parameters"]``: it is run a second time (smoke
size) with them, ``{data:NAME}`` standing for the local file of manifest entry NAME -- the
path a user's report takes -- and ``{made:FILE}`` for a file that :data:`MADE` writes (for
kinds of data no manifest entry has, e.g. a flat-fielded phase-contrast projection).
"""
from __future__ import annotations

import re
import time
from pathlib import Path

import nbformat
import pytest

from tomoml_nb.report import run_report

def _phase_projection(path):
    """A near-field image as a beamline would save it: flat-fielded, float32 TIFF, 64 x 64."""
    import tifffile

    from tomoml_nb import phase as P

    ph = P.mixed_material_phantom((64, 64, 64), 20.0, 1e-6, seed=5)
    sim = P.simulate_phase_contrast(ph["delta"], ph["beta"], 20.0, 0.05, 1e-6, flux=1e4, seed=5)
    tifffile.imwrite(path, sim["intensity"])


MADE = {"phase_projection.tif": _phase_projection}

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


def _own_data(notebook):
    nb = nbformat.read(notebook, as_version=4)
    return nb.metadata.get("tomoml", {}).get("own_data_parameters")


OWN_DATA = [p for p in NOTEBOOKS if _own_data(p)]


@pytest.mark.notebook
@pytest.mark.parametrize("notebook", OWN_DATA, ids=[p.stem for p in OWN_DATA])
def test_notebook_runs_on_a_users_file(notebook, tmp_path, monkeypatch):
    from tomoml_nb import data

    nb = nbformat.read(notebook, as_version=4)
    params = dict(nb.metadata["tomoml"].get("smoke_parameters", {}))
    files = []
    for k, v in nb.metadata["tomoml"]["own_data_parameters"].items():
        made = re.fullmatch(r"\{made:([\w.-]+)\}", str(v))
        if made:
            v = tmp_path / made.group(1)
            MADE[made.group(1)](v)
            files.append(v.name)
            v = v.name                                # relative: read from the folder the report runs in
        m = re.fullmatch(r"\{data:([\w-]+)\}", str(v))
        if m:
            try:
                v = str(data.path(m.group(1), download=False))
            except data.DataError:
                pytest.skip(f"{m.group(1)} is not in the local mirror")
            files.append(Path(v).name)
        params[k] = v
    monkeypatch.chdir(tmp_path)                       # as a user would: somewhere else than notebooks/
    report = run_report(notebook, params, "reports", progress=False, timeout=600)
    assert report.ok, report.error
    executed = nbformat.read(report.notebook, as_version=4)
    text = "".join(o.get("text", "") for c in executed.cells if c.cell_type == "code" for o in c.get("outputs", []))
    missing = [f for f in files if f not in text]
    assert not missing, f"the own-data section never named {missing}: was it skipped?"


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 2
