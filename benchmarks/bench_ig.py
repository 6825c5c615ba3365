"""Integrated gradients vs exact and first-order patching: cost in forward-equivalents and ranking quality.

    .venv/bin/python benchmarks/bench_ig.py [--models organism-strong,gemma3-270m] [--contexts 2] [--examples 6]
                                            [--steps 20] [--repeats 3]

Per model, on one correct- vs flipped-label pair (denoising, per-head output at every position):

* exact patching: ``Patcher(model, pair).sweep("head_out", "denoise")`` (fresh Patcher, its cached runs included);
* first-order attribution patching: ``attribution_patch(model, pair, ("head_out",))`` (2 forwards + 1 backward);
* path IG: ``path_ig(model, pair, steps)`` (fresh Patcher: its two cached runs included);
* AttAttr of every layer on the flipped contexts (cost only: it attributes attention patterns, not patches).

Cost unit: one measured forward of the pair's batch (``run_to_final``, no grad, up to the query slot),
median over repeats; each method's median seconds / that = forward-equivalents. Ranking: Spearman,
top-10 overlap and sign agreement (heads with |exact effect| >= 0.01) of first order and path IG against
the exact per-head effects (``integrated_gradients.ranking_comparison``), and the heads where first order
and IG disagree in sign, with the exact effect. One thread, repeats interleaved, medians printed.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import pandas as pd
import torch
from _common import MACHINE  # noqa: F401 - importing it prints the machine line (CPU, one-thread matmul GFLOPS)

from mechicl.analysis.engine.hooks import run_to_final
from mechicl.analysis.gradients.attattr import attattr
from mechicl.analysis.gradients.ig import ranking_comparison, sign_disagreements
from mechicl.analysis.gradients.path_ig import path_ig
from mechicl.analysis.patching.attribution import attribution_patch
from mechicl.analysis.patching.exact import Patcher
from mechicl.data.pairs import pair_for
from mechicl.data.tasks import load_task
from mechicl.models.loading import load_model
from mechicl.runs.markdown import md_table

warnings.filterwarnings("ignore")
TASKS = {"organism-strong": "organism", "organism-weak": "organism"}


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def bench_model(name: str, args: argparse.Namespace) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One model: cost table and the sign-disagreement table."""
    loaded = load_model(name)
    model = loaded.model
    pair = pair_for(loaded, load_task(TASKS.get(name, args.task)), args.contexts, args.examples, seed=args.seed)
    width = int(pair.query_pos.max()) + 1
    tokens = pair.corrupted.tokens[:, :width]
    methods = {
        "forward": lambda: torch.no_grad()(run_to_final)(model, tokens),
        "exact patching": lambda: Patcher(model, pair, max_rows=args.max_rows).sweep("head_out", "denoise"),
        "first-order": lambda: attribution_patch(model, pair, ("head_out",), "denoise")["head_out"],
        f"path IG (m={args.steps})": lambda: path_ig(model, pair, args.steps, max_rows=args.max_rows),
        f"AttAttr (m={args.steps}, all layers)": lambda: attattr(
            model, pair.corrupted, steps=args.steps, max_rows=args.max_rows
        ),
    }
    times: dict[str, list[float]] = {k: [] for k in methods}
    outs: dict[str, object] = {}
    for _ in range(args.repeats):  # interleaved
        for k, fn in methods.items():
            s, outs[k] = _timed(fn)
            times[k].append(s)
    fwd = statistics.median(times["forward"])
    exact = outs["exact patching"].effect
    ig_key = f"path IG (m={args.steps})"
    ests = {"first-order": outs["first-order"].effect, ig_key: outs[ig_key].heads}
    rank = ranking_comparison(exact, ests, k=10).set_index("method")
    counted = {
        "exact patching": outs["exact patching"].forwards,
        "first-order": 3.0,
        ig_key: outs[ig_key].forwards + outs[ig_key].backwards,
    }
    rows = []
    for k in methods:
        if k == "forward":
            continue
        med = statistics.median(times[k])
        row = {
            "model": name,
            "method": k,
            "seconds": med,
            "forward_equivalents": med / fwd,
            "counted_fwd_equiv": counted.get(k, float("nan")),
        }
        if k in rank.index:
            row.update(rank.loc[k, ["spearman", "topk_overlap", "sign_agreement"]].to_dict())
        rows.append(row)
    dis = sign_disagreements(exact, ests["first-order"], ests[ig_key], min_size=1e-3).assign(model=name)
    print(
        f"[{name}] {args.contexts} contexts x {args.examples} examples, width {width}, one forward "
        f"{fwd * 1e3:.1f} ms (median of {args.repeats}); path IG completeness residual per layer at m={args.steps}: "
        f"max |.| = {float(outs[ig_key].residual.abs().max()):.4f}",
        flush=True,
    )
    return pd.DataFrame(rows), dis


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="organism-strong,gemma3-270m")
    ap.add_argument("--task", default="vader-words", help="task for non-organism models (default vader-words)")
    ap.add_argument("--contexts", type=int, default=2)
    ap.add_argument("--examples", type=int, default=6)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-rows", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    tables, dis = zip(*(bench_model(m.strip(), args) for m in args.models.split(",")))
    t = pd.concat(tables, ignore_index=True)
    print(md_table(t))
    print("\nSign disagreements, first order vs path IG (|estimate| >= 1e-3), with exact patching:")
    d = pd.concat(dis, ignore_index=True)
    print(md_table(d, 4) if len(d) else "none")
    for m, g in t.groupby("model", sort=False):
        g = g.set_index("method")
        ig = [k for k in g.index if k.startswith("path IG")][0]
        closer = g.loc[ig, "spearman"] > g.loc["first-order", "spearman"]
        print(
            f"{m}: path IG Spearman {g.loc[ig, 'spearman']:.3f} vs first order {g.loc['first-order', 'spearman']:.3f} "
            f"-> IG ranks {'closer to' if closer else 'NOT closer to'} exact patching, at "
            f"{g.loc[ig, 'forward_equivalents'] / g.loc['first-order', 'forward_equivalents']:.0f}x first order's cost "
            f"and {g.loc[ig, 'forward_equivalents'] / g.loc['exact patching', 'forward_equivalents']:.1f}x exact patching's."
        )


if __name__ == "__main__":
    main()
