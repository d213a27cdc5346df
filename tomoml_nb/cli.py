"""The ``tomoml`` command: reports, data, environment check.

Examples
--------
::

    tomoml report notebooks/01_reconstruction.ipynb -p n_angles 360 -o reports/
    tomoml report notebooks/08_digital_volume_correlation.ipynb -f params.yaml
    # -p/-f values are YAML 1.2: 5e-7 is a float, 010 the int 10; yes/no/on/off and dates stay text
    tomoml data list
    tomoml data fetch --all          # before an offline workshop
    tomoml data verify
    tomoml doctor
"""
from __future__ import annotations

import argparse
import importlib
import platform
import re
import sys

__all__ = ["main"]


def _cmd_report(args) -> int:
    from .report import read_parameter_file, run_report

    params = {}
    if args.file:
        try:
            params.update(read_parameter_file(args.file))
        except (ValueError, OSError) as exc:
            print(f"error: -f {str(exc).removeprefix('file: ')}", file=sys.stderr)
            return 2
    for name, value in args.param or []:
        params[name] = value
    try:
        report = run_report(args.notebook, params, args.output_dir, kernel=args.kernel,
                            html=not args.no_html, overwrite=args.overwrite, timeout=args.timeout)
    except (ValueError, OSError) as exc:  # bad parameters, notebook or output folder: one line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not report.ok:
        print(f"error: report failed\n{report.error}", file=sys.stderr)
        print(f"executed notebook (with the error): {report.notebook}", file=sys.stderr)
        return 1
    print(f"report notebook: {report.notebook}")
    if report.html:
        print(f"report html:     {report.html}")
    return 0


def _table(rows, cols) -> str:
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) if rows else len(c) for c in cols]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(r[c]).ljust(w) for c, w in zip(cols, widths)) for r in rows]
    return "\n".join(lines)


def _cmd_data(args) -> int:
    from . import data

    try:
        if args.data_cmd == "list":
            print(_table(data.list_datasets(), ["name", "kind", "size", "licence", "status"]))
            print(f"\ncache: {data.cache_dir()}   mirrors: {', '.join(map(str, data.mirror_dirs())) or '(none)'}")
            return 0
        if args.data_cmd == "fetch":
            if not args.all and not args.name:
                print("error: give a data set NAME or --all", file=sys.stderr)
                return 2
            for f in data.fetch(None if args.all else args.name, all=args.all):
                print(f"ok  {f}")
            return 0
        if args.data_cmd == "verify":
            result = data.verify(args.name)
            bad = 0
            for n, status in result.items():
                print(f"{n:28s} {status}")
                bad += status.startswith("MISMATCH")
            if bad:
                print(f"\n{bad} file(s) do not match their sha256: delete them and run `tomoml data fetch NAME`",
                      file=sys.stderr)
            return 1 if bad else 0
    except (KeyError, ValueError, data.DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 2


def _doctor_checks():
    """Yield (ok, required, label, detail/fix) tuples."""
    py_ok = sys.version_info >= (3, 10)
    yield py_ok, True, f"Python {platform.python_version()}", "" if py_ok else "use Python >= 3.10 (3.11 tested)"
    for mod, required in [("numpy", True), ("scipy", True), ("skimage", True), ("torch", True),
                          ("matplotlib", True), ("papermill", True), ("nbconvert", True), ("ipykernel", True),
                          ("ipywidgets", True), ("h5py", True), ("tifffile", True), ("zarr", True),
                          ("pooch", True), ("monai", False), ("k3d", False), ("itkwidgets", False),
                          ("astra", False), ("jupyterlab", False)]:
        try:
            m = importlib.import_module(mod)
            yield True, required, f"{mod} {getattr(m, '__version__', '?')}", ""
        except Exception as exc:  # ImportError or a broken install
            fix = "run `make test` (or pip install -e .)" if required else "optional; install the matching extra"
            yield False, required, f"{mod} not importable ({type(exc).__name__})", fix
    try:
        import torch

        if torch.cuda.is_available():
            yield True, False, f"GPU: {torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})", ""
        else:
            yield True, False, "GPU: none, everything runs on the CPU (slower training)", ""
        yield True, False, f"torch threads: {torch.get_num_threads()}", ""
    except Exception:
        pass
    try:
        from jupyter_client.kernelspec import KernelSpecManager

        specs = KernelSpecManager().find_kernel_specs()
        ok = "python3" in specs
        yield ok, True, "Jupyter kernel 'python3'" + (f" at {specs['python3']}" if ok else " missing"), \
            "" if ok else "run `python -m ipykernel install --user --name python3`"
    except Exception as exc:
        yield False, True, f"Jupyter kernels not listable ({exc})", "pip install ipykernel jupyter_client"
    try:
        from . import data

        cache = data.cache_dir()
        yield True, False, f"data cache: {cache}", ""
        for n, status in data.verify().items():
            ok = status.startswith("ok")
            fix = "" if ok else (f"`tomoml data fetch {n}` (network) or set TOMOML_DATA_MIRROR"
                                 if status == "missing" else "delete the file and fetch it again")
            yield ok, False, f"data {n}: {status}", fix
    except Exception as exc:
        yield False, True, f"data manifest unreadable: {exc}", "reinstall from the repository"


def _cmd_doctor(args) -> int:
    failed = 0
    for ok, required, label, fix in _doctor_checks():
        mark = "ok " if ok else ("ERR" if required else "-- ")
        print(f"[{mark}] {label}" + (f"\n       fix: {fix}" if fix else ""))
        failed += (not ok) and required
    print("\nall required checks passed" if not failed else f"\n{failed} required check(s) failed")
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tomoml", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    r = sub.add_parser("report", help="run a notebook with parameters into an executed .ipynb and HTML")
    r.add_argument("notebook")
    r.add_argument("-p", "--param", nargs=2, action="append", metavar=("NAME", "VALUE"),
                   help="set a parameter; the value is read as YAML 1.2: 3 and 010 are ints, 0.5, 5e-7 and "
                        "1E3 floats, true/false booleans, null/None None, [64, 64] a list; anything else "
                        "(yes, no, on, off, 2026-01-01, my_t0.tif) stays text")
    r.add_argument("-f", "--file", help="YAML file of parameters (name: value lines, same rules as -p; "
                                        "-p overrides it)")
    r.add_argument("-o", "--output-dir", default="reports",
                   help="output folder (default: reports); existing files are never replaced: the report "
                        "gets the next free name NAME-1, NAME-2... unless --overwrite")
    # argparse takes -2.5e-3 for an option (its negative-number pattern has no exponent); let it be a value
    r._negative_number_matcher = re.compile(r"^-(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?$")
    r.add_argument("-k", "--kernel", default="python3")
    r.add_argument("--timeout", type=float, default=None, help="per-cell timeout in seconds")
    r.add_argument("--overwrite", action="store_true", help="replace existing report files")
    r.add_argument("--no-html", action="store_true", help="skip the HTML export")
    r.set_defaults(func=_cmd_report)

    d = sub.add_parser("data", help="list, fetch and verify data sets")
    dsub = d.add_subparsers(dest="data_cmd", required=True)
    dsub.add_parser("list", help="manifest entries with size, licence and local status")
    f = dsub.add_parser("fetch", help="copy/download data sets into the cache (for offline use)")
    f.add_argument("name", nargs="?")
    f.add_argument("--all", action="store_true")
    v = dsub.add_parser("verify", help="check sha256 of cached and mirrored files")
    v.add_argument("name", nargs="?")
    d.set_defaults(func=_cmd_data)

    doc = sub.add_parser("doctor", help="check the environment and say what to fix")
    doc.set_defaults(func=_cmd_doctor)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
