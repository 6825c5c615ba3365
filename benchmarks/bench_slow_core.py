"""A command's wall time and peak RSS on an emulated slower core: one CPU capped by a CFS quota.

    run as root (it writes a cgroup):
    python benchmarks/bench_slow_core.py --gflops 40 -- .venv/bin/mechicl report --threads 1 --out /tmp/r

Issue 31 asks the main job to finish in 5 min on a core with a 40-GFLOPS one-thread fp32 matmul (an AVX2-only
AMD EPYC took 826 s). No such machine is here, so this script slows this one down: it measures the sustained
one-thread matmul rate (``--probe-seconds`` of back-to-back 512 x 512 products, ``machine.matmul_gflops(seconds=)``:
a median of single products would miss the throttling, each fits inside one quota slice), creates a cgroup-v1
``cpu`` group whose CFS quota is ``period x target / measured``, measures the rate again inside it (and corrects the
quota up to twice until it is within 5% of the target), then runs the
command inside it (children inherit the group; ``bench_memory.run_child``, its output captured) and prints its wall
time and peak RSS (``os.wait4``). The group is removed afterwards.

What it emulates and what not: the quota gives the command that share of the core's time in slices of
``--period-us`` (default 10 ms), so compute-bound work runs at the target rate; memory bandwidth, caches and the
vector width (AVX2 vs AVX-512) stay this machine's, so memory-bound phases run relatively faster than on a
really slower core. Read the result as an estimate of the slower machine, not a measurement on it.
Needs write access to ``/sys/fs/cgroup/cpu`` (root in this project's containers); says so and exits otherwise.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from bench_memory import run_child  # also prints this machine's line first, as every benchmark does

CGROUP_ROOT = Path("/sys/fs/cgroup/cpu")
PROBE = "import sys; from mechicl.models.machine import matmul_gflops; print(matmul_gflops(seconds=float(sys.argv[1])))"


def sustained_gflops(seconds: float, preexec: Any = None) -> float:
    """The sustained one-thread matmul rate (``machine.matmul_gflops(seconds=...)``) in a child process."""
    return float(run_child([sys.executable, "-c", PROBE, str(seconds)], preexec)[2].strip().splitlines()[-1])


def make_group(quota_us: int, period_us: int) -> Path:
    """A new cgroup-v1 cpu group with that CFS quota and period; raises SystemExit with the fix if it cannot."""
    group = CGROUP_ROOT / f"mechicl-slow-{os.getpid()}"
    try:
        group.mkdir()
        (group / "cpu.cfs_period_us").write_text(str(period_us))
        (group / "cpu.cfs_quota_us").write_text(str(quota_us))
    except OSError as e:
        raise SystemExit(
            f"cannot create a CPU-quota group under {CGROUP_ROOT} ({e}): this script needs a cgroup-v1 cpu "
            "controller it may write to (root in a container that mounts it writable); run it there, or time the "
            "command on a really slower machine"
        ) from None
    return group


def join(group: Path) -> Any:
    """A ``preexec_fn`` that moves the child into ``group`` before it runs."""
    return lambda: (group / "tasks").write_text(str(os.getpid()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gflops", type=float, default=40.0, help="target sustained one-thread matmul GFLOPS (40)")
    ap.add_argument("--period-us", type=int, default=10_000, help="CFS period in microseconds (default 10 ms)")
    ap.add_argument("--probe-seconds", type=float, default=3.0, help="length of each sustained probe (default 3 s)")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    args = ap.parse_args()
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        ap.error("give the command to run after --, e.g. -- .venv/bin/mechicl report --threads 1")
    native = sustained_gflops(args.probe_seconds)
    if args.gflops >= native:
        raise SystemExit(f"this core already sustains {native:.0f} GFLOPS <= the target {args.gflops:.0f}: no cap")
    quota = max(1000, round(args.period_us * args.gflops / native))
    group = make_group(quota, args.period_us)
    try:
        capped = sustained_gflops(args.probe_seconds, join(group))
        for _ in range(2):  # the quota's own overhead: correct it towards the target from the measured rate
            if abs(capped - args.gflops) <= 0.05 * args.gflops:
                break
            quota = max(1000, min(args.period_us, round(quota * args.gflops / capped)))
            (group / "cpu.cfs_quota_us").write_text(str(quota))
            capped = sustained_gflops(args.probe_seconds, join(group))
        print(f"sustained one-thread matmul: {native:.1f} GFLOPS here, {capped:.1f} GFLOPS inside the group")
        print(f"CFS quota {quota} us per {args.period_us} us ({quota / args.period_us:.1%} of one CPU)")
        wall, peak, _ = run_child(cmd, join(group))  # raises with the command's stderr if it fails
        after = sustained_gflops(args.probe_seconds, join(group))
    finally:
        for _ in range(50):  # the group empties once its last child has exited
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.1)
    print(f"inside the group again after the command: {after:.1f} GFLOPS")
    print("| command | wall s | peak RSS MB | emulated GFLOPS (before / after) |")
    print("|---|---|---|---|")
    print(f"| `{' '.join(cmd)}` | {wall:.0f} | {peak:.0f} | {capped:.1f} / {after:.1f} |")


if __name__ == "__main__":
    main()
