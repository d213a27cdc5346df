"""Notebook → report: run a notebook with papermill and export a standalone HTML.

A beamline scientist turns a tutorial notebook into a report on a user's data::

    tomoml report notebooks/01_reconstruction.ipynb -p n_angles 360 -o reports/

The executed notebook and an HTML export that loads nothing from the network are
written to the output folder; existing files are never overwritten (a numbered
suffix is added) unless asked.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import nbformat
import yaml

__all__ = ["ReportError", "Report", "notebook_parameters", "parse_value", "read_parameter_file", "run_report",
           "export_html"]

TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
#: The tutorial notebooks of a source checkout; a bare notebook name is looked up here.
NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"


class ReportError(RuntimeError):
    """A report could not be produced; the message says which cell failed and why."""


@dataclass
class Report:
    """Result of :func:`run_report`."""

    notebook: Path
    html: Path | None
    parameters: dict = field(default_factory=dict)
    ok: bool = True
    error: str = ""


def _check_notebook(notebook) -> Path:
    nb_path = Path(notebook)
    if not nb_path.is_file() and len(nb_path.parts) == 1:
        # A bare name ("04_semantic_segmentation" or "...ipynb") means one of the tutorial
        # notebooks, wherever the command runs from.
        shipped = NOTEBOOK_DIR / nb_path.with_suffix(".ipynb").name
        if shipped.is_file():
            nb_path = shipped
        else:
            raise FileNotFoundError(f"notebook: {nb_path} does not exist here nor among the tutorial "
                                    f"notebooks in {NOTEBOOK_DIR}")
    if not nb_path.is_file():
        raise FileNotFoundError(f"notebook: {nb_path} does not exist")
    if nb_path.suffix != ".ipynb":
        raise ValueError(f"notebook: {nb_path.name} is not a .ipynb file")
    return nb_path


def notebook_parameters(notebook) -> dict:
    """The parameters declared in the notebook's ``parameters`` cell, with defaults.

    Returns
    -------
    dict
        ``{name: {"default": str, "type": str, "help": str}}`` as papermill infers them.

    Examples
    --------
    >>> sorted(notebook_parameters("notebooks/00_getting_started.ipynb"))   # doctest: +SKIP
    ['phantom_shape', 'seed', 'viewer']
    """
    import papermill

    nb_path = _check_notebook(notebook)
    params = papermill.inspect_notebook(str(nb_path))
    return {k: {"default": v.get("default"), "type": v.get("inferred_type_name"), "help": v.get("help", "")}
            for k, v in params.items()}


_BOOL, _INT, _FLOAT = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"


class _ParameterLoader(yaml.SafeLoader):
    """YAML with YAML 1.2 (core schema) scalars: what a parameter value looks like is what it is.

    PyYAML follows YAML 1.1, which reads ``5e-7`` as text, ``010`` as octal 8, ``no``/``off``
    as False and ``2026-01-01`` as a date. Here numbers are decimal ints or floats (``5e-7``,
    ``1E3``, ``-2.5e-3``, ``.inf``; ``0x``/``0o`` prefixes for hex/octal), booleans are only
    ``true``/``false``, and dates, ``yes``/``no``/``on``/``off`` stay strings.
    """


_ParameterLoader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in resolvers
         if tag not in (_BOOL, _INT, _FLOAT, "tag:yaml.org,2002:timestamp")]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_ParameterLoader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
# ints before floats: the first resolver that matches wins
_ParameterLoader.add_implicit_resolver(_INT, re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"),
                                       list("-+0123456789"))
_ParameterLoader.add_implicit_resolver(
    _FLOAT, re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
                       r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"), list("-+0123456789."))


def _construct_int(loader, node):
    text = loader.construct_scalar(node)
    if text[:2] in ("0x", "0o"):
        return int(text[2:], 16 if text[1] == "x" else 8)
    return int(text, 10)  # decimal, also with leading zeros: 010 is 10


_ParameterLoader.add_constructor(_INT, _construct_int)


def _load_yaml(text: str):
    return yaml.load(text, Loader=_ParameterLoader)  # noqa: S506 - a SafeLoader subclass


def parse_value(text: str):
    """Parse a command-line parameter value: numbers, booleans, lists via YAML; else the string.

    Values are read as YAML 1.2: decimal integers stay ``int`` (``010`` is 10, no octal),
    numbers with a point or an exponent are ``float`` (``5e-7``, ``1E3``, ``-2.5e-3``),
    ``true``/``false`` are booleans, ``null``/``None``/``~`` are None and ``[...]`` are
    lists. Everything else is kept as the string: ``yes``/``no``/``on``/``off``, dates
    such as ``2026-01-01``, file names, and text with a colon (a mapping is kept as text).

    Examples
    --------
    >>> parse_value("3"), parse_value("0.5"), parse_value("true"), parse_value("[64, 64]")
    (3, 0.5, True, [64, 64])
    >>> parse_value("5e-7"), parse_value("010"), parse_value("no"), parse_value("2026-01-01")
    (5e-07, 10, 'no', '2026-01-01')
    >>> parse_value("my_t0.tif")
    'my_t0.tif'
    """
    if not isinstance(text, str):
        return text
    try:
        value = _load_yaml(text)
    except yaml.YAMLError:
        return text
    if value is None and text.strip().lower() not in ("null", "none", "~", ""):
        return text
    if isinstance(value, str) and text.strip().lower() == "none":
        return None
    return value if not isinstance(value, (dict,)) else text


def read_parameter_file(file) -> dict:
    """Read a YAML file of report parameters (``name: value`` lines) with the rules of :func:`parse_value`.

    Numbers in exponent notation are floats, ``010`` is 10, ``yes``/``no``/``on``/``off``
    and dates stay strings; lists and mappings are kept.

    Raises
    ------
    FileNotFoundError
        If ``file`` does not exist.
    ValueError
        If the file is not valid YAML (the message gives the line and column) or is not a
        mapping of parameter names to values.

    Examples
    --------
    >>> read_parameter_file("params.yaml")      # doctest: +SKIP
    {'pixel_size_m': 5e-07, 'seed': 3}
    """
    pf = Path(file)
    if not pf.is_file():
        raise FileNotFoundError(f"file: {pf} not found")
    try:
        loaded = _load_yaml(pf.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = getattr(exc, "problem", None) or type(exc).__name__
        raise ValueError(f"file: {pf} is not valid YAML ({what}{where})") from None
    except UnicodeDecodeError:
        raise ValueError(f"file: {pf} is not a UTF-8 text file") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ValueError(f"file: {pf} is not a mapping of parameter names to values "
                         f"(got a {type(loaded).__name__})")
    return loaded


def _free_path(path: Path, overwrite: bool) -> Path:
    if overwrite or not path.exists():
        return path
    for i in range(1, 10_000):
        candidate = path.with_name(f"{path.stem}-{i}{path.suffix}")
        if not candidate.exists():
            return candidate
    raise ReportError(f"output_dir: too many reports named {path.stem}-N in {path.parent}")


def _free_stem(out_dir: Path, base: str, overwrite: bool) -> str:
    """``base``, or ``base-1``, ``base-2``... the first stem with neither a .ipynb nor a .html in ``out_dir``."""
    if overwrite:
        return base
    for i in range(10_000):
        stem = base if i == 0 else f"{base}-{i}"
        if not (out_dir / f"{stem}.ipynb").exists() and not (out_dir / f"{stem}.html").exists():
            return stem
    raise ReportError(f"output_dir: too many reports named {base}-N in {out_dir}")


def run_report(notebook, parameters: dict | None = None, output_dir="reports", *, kernel: str = "python3",
               html: bool = True, overwrite: bool = False, name: str | None = None,
               timeout: float | None = None, progress: bool = True, cwd=None) -> Report:
    """Execute ``notebook`` with ``parameters`` and write the executed notebook and HTML.

    Parameters
    ----------
    notebook : str or Path
        The notebook (its first code cell tagged ``parameters``).
    parameters : dict, optional
        Values injected after the parameters cell. Unknown names are an error that lists
        the notebook's parameters.
    output_dir : str or Path
        Folder for ``<name>.ipynb`` and ``<name>.html`` (created if needed; must not be a file).
    kernel : str
        Jupyter kernel name.
    html : bool
        Also export standalone HTML (no CDN: widget state stripped, images embedded).
    overwrite : bool
        Replace existing report files. By default nothing is overwritten: when
        ``<name>.ipynb`` or ``<name>.html`` exists, both outputs get the first free
        numbered name (``<name>-1.ipynb`` and ``<name>-1.html``, then ``-2``...).
    name : str, optional
        Base name of the outputs (default: the notebook's stem).
    timeout : float, optional
        Per-cell timeout in seconds.
    cwd : str or Path, optional
        Working directory of the notebook's kernel; default the current one, so that
        relative paths given as parameters (``-p own_fixed my_t0.tif``) are read from where the
        command was run, as for ``output_dir``.

    Raises
    ------
    FileNotFoundError
        If ``notebook`` does not exist.
    ValueError
        If a parameter name is unknown, or ``output_dir`` exists and is not a folder.

    Returns
    -------
    Report
        Paths of the outputs; ``ok`` is False when a cell failed (then ``error`` holds the
        failing cell's source and the error) — the files are still written, so the
        failure can be read in context.

    Examples
    --------
    >>> r = run_report("notebooks/00_getting_started.ipynb", {"seed": 1})   # doctest: +SKIP
    >>> r.html                                                             # doctest: +SKIP
    PosixPath('reports/00_getting_started.html')
    """
    import papermill
    from papermill.exceptions import PapermillExecutionError

    nb_path = _check_notebook(notebook)
    parameters = {k: parse_value(v) for k, v in (parameters or {}).items()}
    declared = notebook_parameters(nb_path)
    unknown = sorted(set(parameters) - set(declared))
    if unknown:
        import difflib

        listing = "\n".join(f"  {k} = {v['default']}" for k, v in declared.items()) or "  (none)"
        hints = [f"{k} -> {close[0]}" for k in unknown for close in [difflib.get_close_matches(k, declared, 1, 0.6)]
                 if close]
        hint = f" (did you mean {', '.join(hints)}?)" if hints else ""
        raise ValueError(f"parameters: unknown name(s) {', '.join(unknown)} for {nb_path.name}{hint}; "
                         f"its parameters are:\n{listing}")
    run_dir = Path(os.getcwd() if cwd is None else cwd).resolve()
    if not run_dir.is_dir():
        raise ValueError(f"cwd: {run_dir} is not a folder")
    out_dir = Path(output_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"output_dir: {out_dir} exists and is not a folder; give a folder for the report files")
    out_dir.mkdir(parents=True, exist_ok=True)
    base = name or nb_path.stem
    out_nb = out_dir / f"{_free_stem(out_dir, base, overwrite)}.ipynb"
    report = Report(notebook=out_nb, html=None, parameters=parameters)
    # The kernel inherits our environment: a headless MPLBACKEND (e.g. Agg in tests) would
    # silently drop every figure from the report, so the kernel always gets the inline backend.
    saved_backend = os.environ.get("MPLBACKEND")
    os.environ["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    try:
        papermill.execute_notebook(str(nb_path), str(out_nb), parameters=parameters, kernel_name=kernel,
                                   cwd=str(run_dir), progress_bar=progress,
                                   execution_timeout=timeout, report_mode=False)
    except PapermillExecutionError as exc:
        report.ok = False
        report.error = (f"cell {exc.cell_index} failed in {nb_path.name}:\n"
                        f"----- cell source -----\n{exc.source}\n----- error -----\n{exc.ename}: {exc.evalue}")
    finally:
        if saved_backend is None:
            os.environ.pop("MPLBACKEND", None)
        else:
            os.environ["MPLBACKEND"] = saved_backend
    if html and out_nb.exists():
        html_path = out_nb.with_suffix(".html")
        # the stem was free before the run; a file that appeared meanwhile is still not ours to replace
        html_path = _free_path(html_path, overwrite)
        report.html = export_html(out_nb, html_path)
    return report


_REMOTE = re.compile(r"""(<script[^>]+src=["']https?://[^"']*["'][^>]*>\s*</script>)|(<link[^>]+href=["']https?://[^"']*["'][^>]*>)""",
                     re.IGNORECASE)


def export_html(notebook, html_path=None) -> Path:
    """Export a notebook to standalone HTML that needs no network.

    Widget state is dropped (it would load a widget manager from a CDN), images are
    embedded, and no script or stylesheet is referenced by URL.

    Examples
    --------
    >>> export_html("reports/00_getting_started.ipynb")    # doctest: +SKIP
    PosixPath('reports/00_getting_started.html')
    """
    from nbconvert import HTMLExporter

    nb_path = Path(notebook)
    nb = nbformat.read(nb_path, as_version=4)
    nb.metadata.pop("widgets", None)
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            data.pop("application/vnd.jupyter.widget-view+json", None)
            data.pop("application/vnd.jupyter.widget-state+json", None)
    exporter = HTMLExporter(template_name="offline", extra_template_basedirs=[str(TEMPLATE_DIR)])
    exporter.embed_images = True
    body, _ = exporter.from_notebook_node(nb)
    body = _REMOTE.sub("", body)
    out = Path(html_path) if html_path is not None else nb_path.with_suffix(".html")
    out.write_text(body, encoding="utf-8")
    return out
