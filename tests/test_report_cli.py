from __future__ import annotations

import nbformat
import pytest

from tomoml_nb import cli
from tomoml_nb.report import NOTEBOOK_DIR, export_html, notebook_parameters, parse_value, run_report


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


def test_an_old_parameter_name_gets_a_did_you_mean(tmp_path):
    # the own-data parameters were renamed to own_* (my_volume -> own_volume)
    nb = NOTEBOOK_DIR / "06_instance_segmentation.ipynb"
    with pytest.raises(ValueError, match=r"unknown name\(s\) my_volume .*did you mean my_volume -> own_volume\?"):
        run_report(nb, {"my_volume": "scan.tif"}, tmp_path, progress=False)


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


# ----------------------------------------------------------------- session 5 fixes
def test_report_never_overwrites_an_existing_html_or_notebook(good_nb, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "good.html").write_text("<p>the user's own page</p>")
    r = run_report(good_nb, {"n": 2}, out, progress=False)
    assert r.ok, r.error
    assert (out / "good.html").read_text() == "<p>the user's own page</p>"
    assert r.notebook.name == "good-1.ipynb" and r.html.name == "good-1.html"
    (out / "good-2.ipynb").write_text("{}")  # only a notebook: the html of that stem is skipped too
    r2 = run_report(good_nb, {"n": 3}, out, progress=False, html=False)
    assert r2.notebook.name == "good-3.ipynb" and (out / "good-2.ipynb").read_text() == "{}"
    r3 = run_report(good_nb, {"n": 4}, out, progress=False, overwrite=True)
    assert r3.notebook.name == "good.ipynb" and r3.html.name == "good.html"


@pytest.mark.parametrize("text,expected", [
    ("5e-7", 5e-7), ("1E3", 1000.0), ("-2.5e-3", -2.5e-3), ("1.0e+3", 1000.0), (".5", 0.5),
    ("010", 10), ("-7", -7), ("0x1F", 31), ("true", True), ("False", False), ("null", None), ("~", None),
    ("no", "no"), ("yes", "yes"), ("on", "on"), ("off", "off"), ("2026-01-01", "2026-01-01"), ("1:30", "1:30"),
    ("[64, 5e-7, no]", [64, 5e-7, "no"]),
])
def test_parse_value_reads_yaml_1_2_numbers_and_keeps_words(text, expected):
    value = parse_value(text)
    assert value == expected and type(value) is type(expected)


def test_parameter_file_uses_the_same_rules(tmp_path):
    from tomoml_nb.report import read_parameter_file

    pf = tmp_path / "p.yaml"
    pf.write_text("pixel_size_m: 5e-7\nn: 010\nflag: no\nday: 2026-01-01\nok: true\nshape: [64, 64]\n"
                  "opts: {a: 1E3}\nnothing: null\n")
    assert read_parameter_file(pf) == {"pixel_size_m": 5e-7, "n": 10, "flag": "no", "day": "2026-01-01",
                                       "ok": True, "shape": [64, 64], "opts": {"a": 1000.0}, "nothing": None}
    assert isinstance(read_parameter_file(pf)["opts"]["a"], float)


def test_cli_parameter_types_reach_the_notebook(tmp_path):
    nb = _notebook(tmp_path / "types.ipynb", body="print('types', type(n).__name__, type(label).__name__, n)")
    pf = tmp_path / "p.yaml"
    pf.write_text("n: 5e-7\nlabel: off\n")
    assert cli.main(["report", str(nb), "-f", str(pf), "-o", str(tmp_path / "a"), "--no-html"]) == 0
    assert cli.main(["report", str(nb), "-p", "n", "-2.5e-3", "-p", "label", "2026-01-01",
                     "-o", str(tmp_path / "b"), "--no-html"]) == 0
    outs = []
    for folder in ("a", "b"):
        executed = nbformat.read(tmp_path / folder / "types.ipynb", as_version=4)
        outs.append("".join(o.get("text", "") for c in executed.cells if c.cell_type == "code" for o in c.outputs))
    assert "types float str 5e-07" in outs[0]
    assert "types float str -0.0025" in outs[1]


def test_cli_bad_parameter_file_and_output_file_are_one_line_errors(good_nb, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("n: [1, 2\nlabel: x\n")
    assert cli.main(["report", str(good_nb), "-f", str(bad), "-o", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: -f") and "bad.yaml" in err and "line" in err and "\n" not in err
    assert "Traceback" not in err
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    assert cli.main(["report", str(good_nb), "-f", str(lst), "-o", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "mapping" in err and "\n" not in err
    a_file = tmp_path / "notafolder.txt"
    a_file.write_text("mine")
    assert cli.main(["report", str(good_nb), "-o", str(a_file)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: output_dir") and "notafolder.txt" in err and "\n" not in err
    assert a_file.read_text() == "mine"


def test_relative_paths_in_parameters_are_read_from_where_the_command_runs(tmp_path, monkeypatch):
    # `tomoml report notebooks/08_....ipynb -p own_fixed my_t0.tif` run in the data folder must find my_t0.tif
    (tmp_path / "nbdir").mkdir()
    nb = _notebook(tmp_path / "nbdir" / "reader.ipynb", body="print('done', open(label).read())")
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "mine.txt").write_text("hello from the user's folder")
    monkeypatch.chdir(data_dir)
    r = run_report(nb, {"label": "mine.txt"}, "out", progress=False)
    assert r.ok, r.error
    assert "hello from the user's folder" in r.html.read_text()
    assert (data_dir / "out" / "reader.ipynb").is_file()
    with pytest.raises(ValueError, match=r"^cwd"):
        run_report(nb, {}, "out", progress=False, cwd=tmp_path / "missing")


def test_a_bare_notebook_name_finds_the_tutorial_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("00_getting_started.ipynb", "00_getting_started"):
        params = notebook_parameters(name)
        assert "dataset" in params and "seed" in params
    with pytest.raises(FileNotFoundError, match="tutorial notebooks"):
        notebook_parameters("99_no_such_notebook.ipynb")
    # A notebook of the user's own, with the same name as a tutorial, is the one used.
    _notebook(tmp_path / "00_getting_started.ipynb")
    assert list(notebook_parameters("00_getting_started.ipynb")) == ["n", "label"]
