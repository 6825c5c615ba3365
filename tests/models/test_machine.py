"""The machine line printed beside timings: a positive rate, the caller's thread count restored, a CPU name."""

from __future__ import annotations

import math

import torch

from mechicl.models.machine import cpu_name, machine_line, matmul_gflops


def test_gflops_is_a_positive_rate_and_threads_are_restored():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        g = matmul_gflops(n=64, repeats=3)
        assert math.isfinite(g) and g > 0 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_sustained_gflops_runs_for_the_time_asked_and_restores_threads():
    import time

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        t = time.perf_counter()
        g = matmul_gflops(n=64, seconds=0.2)
        assert time.perf_counter() - t >= 0.2
        assert math.isfinite(g) and g > 0 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_machine_line_names_the_cpu_and_the_rate():
    line = machine_line()
    assert line.startswith(cpu_name()) and line.endswith("GFLOPS (one-thread fp32 matmul)")
