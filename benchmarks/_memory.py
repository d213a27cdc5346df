"""Process memory for the benchmarks' fresh-process measurements.

``resource.getrusage(RUSAGE_SELF).ru_maxrss`` is not reset by ``exec``: a child started
from a benchmark that already holds 2 GB reports at least 2 GB, whatever it does itself
(measured: every size of the segmentation benchmark read 2132 MB). The kernel's ``VmHWM``
(peak) and ``VmRSS`` (now) in ``/proc/self/status`` belong to the new process image.
Child scripts import this file with ``sys.path.insert(0, <benchmarks folder>)``.
"""
from __future__ import annotations

from pathlib import Path

_STATUS = Path("/proc/self/status")


def _status_mb(key):
    if _STATUS.exists():
        for line in _STATUS.read_text().splitlines():
            if line.startswith(key + ":"):
                return float(line.split()[1]) / 1024
    return None


def peak_mb():
    """Peak resident memory (MB) of this process image: VmHWM, or ru_maxrss where /proc is absent
    (an upper bound there)."""
    v = _status_mb("VmHWM")
    if v is None:
        import resource

        v = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return v


def current_mb():
    """Resident memory (MB) now: VmRSS (``nan`` where /proc is absent)."""
    v = _status_mb("VmRSS")
    return float("nan") if v is None else v
