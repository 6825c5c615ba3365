"""Collect the benchmarks' result rows into one markdown table (docs/speed.md, checked by tests/test_docs.py).

    python benchmarks/table.py [benchmarks/results/rows.jsonl ...]

Reads the JSON lines that ``bench_patching.py`` (P1 against TransformerLens; P1-nnsight, the same sweep against
nnsight), ``bench_readout_heads.py``, ``bench_readout.py``, ``bench_memory.py``, ``bench_long_context.py`` and
``bench_grid.py`` (the findings grid on workers against serial) append with ``--rows FILE`` (rows that carry ``tokens``
also show the time per 1k tokens). Rows of the same benchmark, model and size
(e.g. one repeat per locked invocation of a long run) are pooled: times are medians over all
their repeats, the ratio is the ratio of those medians, max |diff| and peak RSS the largest.
Each row names the command(s) that produced it (numbered below the table). Loads no model.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

DEFAULT = Path(__file__).resolve().parent / "results" / "rows.jsonl"
ORDER = {"P1": 0, "P1-nnsight": 1, "P1b": 2, "P3": 3, "memory": 4, "memory-stage": 5, "long-context": 6, "grid": 7}
COMMANDS = {"load": 0, "patch": 1, "heads": 2, "report": 3}


def sort_key(key: tuple, first: dict) -> tuple:
    """Benchmark, model, then size: examples (or K) ascending, the memory commands in their order, else as run."""
    bench, model, size = key
    m = re.search(r"(\d+) ex|K=(\d+)", size)
    n = int(next(g for g in m.groups() if g)) if m else COMMANDS.get(size, 9 + first[key])
    return ORDER.get(bench, 9), model, n, size


def pooled(rows: list[dict]) -> dict:
    """One row per (bench, model, size), its times pooled over invocations."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["bench"], r["model"], r["size"]), []).append(r)
    out = {}
    for key, rs in groups.items():
        g = dict(rs[-1])
        for f in ("ours_times", "ref_times", "readout_forward_times"):
            g[f] = [t for r in rs for t in r.get(f, [])]
        for f in ("max_diff", "ours_peak_mb", "ref_peak_mb"):
            vals = [r[f] for r in rs if r.get(f) is not None]
            g[f] = max(vals) if vals else None
        g["commands"] = list(dict.fromkeys(r["command"] for r in rs))
        out[key] = g
    return out


def fmt(x: float | None, spec: str) -> str:
    return "" if x is None else format(x, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("files", nargs="*", type=Path, default=[DEFAULT])
    args = ap.parse_args()
    rows = [json.loads(line) for f in args.files for line in f.read_text().splitlines() if line.strip()]
    groups = pooled(rows)
    commands: list[str] = []
    print(
        "| bench | model | size | mechicl | reference | mechicl s | reference s | ratio | max abs diff "
        "| FLOP bound s (mechicl / bound) | peak RSS MB mechicl / ref (model alone) | repeats | cmd |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    first = {k: i for i, k in enumerate(groups)}
    for key in sorted(groups, key=lambda k: sort_key(k, first)):
        g = groups[key]
        if g["bench"] == "memory" and ("memory", g["model"], "load") in groups:  # the model alone, measured by `load`
            g["model_rss_mb"] = groups[("memory", g["model"], "load")]["model_rss_mb"]
        o = statistics.median(g["ours_times"])
        o_text = "-" if g["bench"] == "memory-stage" else f"{o:.2f}"  # a stage's row carries the whole run's time
        if g.get("tokens"):  # long-context rows: the cost per 1k tokens of the pooled median
            o_text += f" ({o / g['tokens'] * 1000:.2f} s / 1k tok)"
        r = statistics.median(g["ref_times"]) if g["ref_times"] else None
        bound = None
        if g["readout_forward_times"]:
            bound = g["n_bound_forwards"] * statistics.median(g["readout_forward_times"])
        ids = []
        for c in g["commands"]:
            if c not in commands:
                commands.append(c)
            ids.append(str(commands.index(c) + 1))
        mem = f"{fmt(g['ours_peak_mb'], '.0f')} / {fmt(g.get('ref_peak_mb'), '.0f') or '-'} ({fmt(g.get('model_rss_mb'), '.0f')})"
        print(
            f"| {g['bench']} | {g['model']} | {g['size']} | {g['ours']} | {g.get('reference', '-')} | {o_text} "
            f"| {fmt(r, '.2f') or '-'} | {f'**{r / o:.1f}x**' if r else '-'} | {fmt(g.get('max_diff'), '.1e') or '-'} "
            f"| {f'{bound:.2f} ({o / bound:.2f}x)' if bound else '-'} | {mem} | {len(g['ours_times'])} | {','.join(ids)} |"
        )
    print()
    for i, c in enumerate(commands, 1):
        print(f"{i}. `flock /tmp/mechicl-cpu.lock {c}`")
    machines = sorted({r.get("machine", "machine not recorded (rows from before issue 31)") for r in rows})
    print()
    print("Machines: " + "; ".join(machines) + ". Compare timings only between rows of one machine.")


if __name__ == "__main__":
    main()
