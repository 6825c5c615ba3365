"""What the CPU can do: the one-thread fp32 matmul rate printed beside every timing, so timings compare across
machines (an AVX2-only core ran the main job several times slower than an AVX-512 one: issue 31).

``matmul_gflops()`` times ``repeats`` products of two ``n x n`` float32 matrices on one torch thread (the caller's
thread setting is restored) and returns the median rate, ``2 n^3 / seconds / 1e9``. Cost: about 0.1 s at n = 512.
``matmul_gflops(seconds=s)`` instead runs products back to back for ``s`` seconds and returns total FLOPs over total
time: the sustained rate, which a CPU quota slows (each single product fits in one quota slice, so their median
would not see it; ``benchmarks/bench_slow_core.py``).
``cpu_name()`` is the ``model name`` line of ``/proc/cpuinfo`` ("unknown CPU" elsewhere).
"""

from __future__ import annotations

import resource
import statistics
import time
from pathlib import Path

import torch


def matmul_gflops(n: int = 512, repeats: int = 9, seconds: float | None = None) -> float:
    """Median one-thread fp32 matmul GFLOPS over ``repeats`` timed products (after one warm-up); with ``seconds``,
    the sustained rate over that many seconds of back-to-back products."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        g = torch.Generator().manual_seed(0)
        a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
        torch.mm(a, b)  # warm-up
        if seconds is not None:
            done, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                torch.mm(a, b)
                done += 1
            return 2 * n**3 * done / (time.perf_counter() - t0) / 1e9
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            torch.mm(a, b)
            times.append(time.perf_counter() - t)
    finally:
        torch.set_num_threads(threads)
    return 2 * n**3 / statistics.median(times) / 1e9


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def machine_line() -> str:
    """``"<cpu>, <x> GFLOPS (one-thread fp32 matmul)"``: what every timing is printed beside."""
    return f"{cpu_name()}, {matmul_gflops():.0f} GFLOPS (one-thread fp32 matmul)"


def peak_rss_gb() -> float:
    """This process's peak resident memory so far, in GB (``ru_maxrss``; Linux reports KiB). It never falls."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
