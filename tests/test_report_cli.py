from __future__ import annotations

import nbformat
import pytest

from tomoml_nb import cli
from tomoml_nb.report import export_html, notebook_parameters, parse_value, run_report


def _notebook(path, body="print('done', n * 2)"):
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell("n = 1\nlabel = 'x'")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [nbformat.v4.new_markdown_cell("# A report"), params, nbformat.v4.new_code_cell(body),
                nbformat.v4.new_code_cell(
                    "import matplotlib.pyplot as plt\nfig, ax = plt.subplots()\nax.plot([1, 2])\nplt.show()")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


@pytest.fixture(scope="module")
def good_nb(tmp_path_factory):
    return _notebook(tmp_path_factory.mktemp("nb") / "good.ipynb")


def test_parse_value():
    assert parse_value("3") == 3 and parse_value("2.5") == 2.5 and parse_value("false") is False
    assert parse_value("[1, 2]") == [1, 2] and parse_value("my_t0.tif") == "my_t0.tif"
    assert parse_value("None") is None


def test_notebook_parameters(good_nb):
    assert set(notebook_parameters(good_nb)) == {"n", "label"}


def test_report_writes_notebook_and_offline_html(good_nb, tmp_path):
    r = run_report(good_nb, {"n": "21"}, tmp_path / "out", progress=False)
    assert r.ok, r.error
    executed = nbformat.read(r.notebook, as_version=4)
    outputs = "".join(o.get("text", "") for c in executed.cells if c.cell_type == "code" for o in c.outputs)
    assert "done 42" in outputs
    html = r.html.read_text()
    assert "done 42" in html
    assert "data:image/png;base64" in html  # figure embedded
    assert 'src="http' not in html and "cdnjs" not in html and "unpkg" not in html
    # a second run never overwrites the first
    r2 = run_report(good_nb, {"n": 1}, tmp_path / "out", progress=False)
    assert r2.notebook.name == "good-1.ipynb" and r.notebook.exists()


def test_unknown_parameter_lists_the_notebook_parameters(good_nb, tmp_path):
    with pytest.raises(ValueError, match=r"(?s)unknown name\(s\) bogus.*n = 1"):
        run_report(good_nb, {"bogus": 1}, tmp_path, progress=False)


def test_failing_cell_is_reported_with_its_source(tmp_path):
    nb = _notebook(tmp_path / "bad.ipynb", body="x = 1\nraise RuntimeError('boom here')")
    r = run_report(nb, {}, tmp_path / "out", progress=False)
    assert not r.ok
    assert "raise RuntimeError('boom here')" in r.error and "RuntimeError: boom here" in r.error
    assert r.notebook.exists() and r.html.exists()


def test_cli_report_exit_codes(good_nb, tmp_path, capsys):
    assert cli.main(["report", str(good_nb), "-p", "n", "5", "-o", str(tmp_path)]) == 0
    assert cli.main(["report", str(good_nb), "-p", "nope", "5", "-o", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and "label" in err
    pf = tmp_path / "p.yaml"
    pf.write_text("n: 3\nlabel: hello\n")
    assert cli.main(["report", str(good_nb), "-f", str(pf), "-o", str(tmp_path), "--no-html"]) == 0
    bad = _notebook(tmp_path / "bad.ipynb", body="1/0")
    assert cli.main(["report", str(bad), "-o", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "1/0" in err and "ZeroDivisionError" in err
    assert cli.main(["report", str(tmp_path / "absent.ipynb")]) == 2


def test_export_html_strips_widget_state(good_nb, tmp_path):
    nb = nbformat.read(good_nb, as_version=4)
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}}}
    p = tmp_path / "w.ipynb"
    nbformat.write(nb, p)
    html = export_html(p).read_text()
    assert "unpkg" not in html and "@jupyter-widgets/html-manager" not in html


def test_cli_data_commands(mirror, capsys, tmp_path, monkeypatch):
    assert cli.main(["data", "list"]) == 0
    out = capsys.readouterr().out
    assert "tomopy_tooth" in out and "GPL-3.0-or-later" in out
    monkeypatch.setenv("TOMOML_DATA_DIR", str(tmp_path))
    assert cli.main(["data", "fetch", "--all"]) == 0
    assert cli.main(["data", "verify"]) == 0
    (tmp_path / "spam_snow_concrete" / "snow.tif").write_bytes(b"broken")
    assert cli.main(["data", "verify"]) == 1
    assert "MISMATCH" in capsys.readouterr().out
    assert cli.main(["data", "fetch", "nope"]) == 1


def test_cli_doctor(capsys):
    assert cli.main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "GPU" in out and "kernel 'python3'" in out
