"""Shared pieces of the benchmarks: timing, peak memory of one call, and the rows that ``table.py`` collects.

Peak memory is the process's peak resident set size while a call runs (Linux ``VmHWM``,
reset before the call by writing 5 to ``/proc/self/clear_refs``, after ``malloc_trim`` so
memory freed by the previous call does not count). It is absolute: the loaded model is in it.
"""

from __future__ import annotations

import ctypes
import json
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mechicl.models.machine import machine_line

_LIBC: Any = None
MACHINE = machine_line()  # measured once per benchmark process: every row and printout names the machine's speed
print(f"[bench] machine: {MACHINE}", flush=True)


def _trim() -> None:
    global _LIBC
    try:
        if _LIBC is None:
            _LIBC = ctypes.CDLL("libc.so.6")
        _LIBC.malloc_trim(0)
    except OSError:
        pass


def rss_mb(field: str = "VmRSS") -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak since the last reset) of this process in MB (1e6 bytes)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024 / 1e6
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def reset_peak() -> None:
    """Start a new peak-RSS window (the peak becomes the current RSS)."""
    _trim()
    Path("/proc/self/clear_refs").write_text("5")


def timed(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    """``(seconds, peak RSS in MB during the call, result)`` of one call."""
    reset_peak()
    t = time.perf_counter()
    out = fn()
    dt = time.perf_counter() - t
    return dt, rss_mb("VmHWM"), out


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def command_line() -> str:
    """The command that is running, as a user would type it from the repository root."""
    return " ".join(shlex.quote(a) for a in ["python", *sys.argv])


def add_row(path: Path | None, **row: Any) -> None:
    """Append one result row (a JSON line) to ``path``, for ``benchmarks/table.py``; the command is recorded."""
    if path is None:
        return
    row.setdefault("command", command_line())
    row.setdefault("machine", MACHINE)
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
