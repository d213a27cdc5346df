"""Run every benchmark script in this folder and write BENCHMARKS.md.

Each ``benchmarks/<name>.py`` writes its section to ``benchmarks/results/<name>.md``;
this script runs them one after another (``--only NAME`` for one) and concatenates the
sections, with the machine they ran on, into ``BENCHMARKS.md`` at the repository root.
Sections of benchmarks not re-run are kept from their last results file.

    python benchmarks/run_all.py            # all
    python benchmarks/run_all.py --only reconstruction --quick
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"


def machine() -> str:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, GPU: {gpu}, "
            f"Python {platform.python_version()}, torch {torch.__version__}, {platform.system()}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", action="append", help="benchmark name(s) to run")
    ap.add_argument("--quick", action="store_true", help="pass --quick to each benchmark")
    ap.add_argument("--collect", action="store_true", help="run nothing; rebuild BENCHMARKS.md from results/")
    args = ap.parse_args(argv)
    scripts = sorted(p for p in HERE.glob("*.py") if p.name != "run_all.py" and not p.name.startswith("_"))
    if args.only:
        scripts = [p for p in scripts if p.stem in args.only]
    if args.collect:
        scripts = []
    RESULTS.mkdir(exist_ok=True)
    failed = []
    for script in scripts:
        print(f"== {script.stem}", flush=True)
        cmd = [sys.executable, str(script)] + (["--quick"] if args.quick else [])
        if subprocess.run(cmd, cwd=ROOT).returncode != 0:
            failed.append(script.stem)
    sections = [p.read_text().strip() for p in sorted(RESULTS.glob("*.md"))]
    now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    text = ["# Benchmarks", "",
            "Written by `make bench` (`python benchmarks/run_all.py`); every figure below comes from the "
            "benchmark scripts in `benchmarks/`, run side by side on one machine. Times are medians over "
            "repeats; compare ratios rather than absolute seconds across machines.", "",
            f"Last run: {now} on {machine()}.", ""]
    text += [s + "\n" for s in sections]
    (ROOT / "BENCHMARKS.md").write_text("\n".join(text))
    print(f"wrote {ROOT / 'BENCHMARKS.md'}" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
