"""The head-finding benchmark with planted ground truth (issue 27, item 1): every method of
``analysis.heads.benchmark.METHODS`` on every organism with planted label heads and an in-context effect.

    flock /tmp/mechicl-cpu.lock .venv/bin/python benchmarks/finder_ground_truth.py

Prints one table (precision and recall per method, mean over organisms with 95% bootstrap CIs over organisms) and
writes ``docs/results/finder_ground_truth.csv`` (one row per organism x method) and ``finder_ground_truth.md``
(the table, the suite check and this command). One torch thread; about a minute on this machine.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
import torch

from mechicl.analysis.heads.benchmark import Sizes, build_suite, score_methods, summary
from mechicl.data.tasks import load_task
from mechicl.models.loading import load_model
from mechicl.models.registry import CONSTRUCTED, ORGANISMS

OUT = Path(__file__).resolve().parents[1] / "docs" / "results"
COMMAND = "flock /tmp/mechicl-cpu.lock .venv/bin/python benchmarks/finder_ground_truth.py"


def _fmt(r: pd.Series, col: str) -> str:
    if pd.isna(r[col]):
        return "n/a"
    return f"{r[col]:.2f} [{r[f'{col}_ci_low']:.2f}, {r[f'{col}_ci_high']:.2f}]"


def table_markdown(tab: pd.DataFrame) -> str:
    head = "| method | precision [95% CI] | recall [95% CI] | selected nothing | non-label planted head | inert head |"
    lines = [head, "|---|---|---|---|---|---|"]
    for _, r in tab.iterrows():
        nl = f"{r.non_label_rate:.2f} (of {r.n_non_label_known})" if r.n_non_label_known else "n/a"
        lines.append(
            f"| {r.method} | {_fmt(r, 'precision')} | {_fmt(r, 'recall')} | {r.empty_rate:.2f} | {nl} "
            f"| {r.inert_rate:.2f} |"
        )
    return "\n".join(lines)


def check_markdown(check: pd.DataFrame) -> str:
    lines = [
        "| organism | gap in P(true) [95% CI] | acc. correct / flipped (last slot) | label heads | in the suite |",
        "|---|---|---|---|---|",
    ]
    for _, r in check.iterrows():
        gap = f"{r.gap:+.3f} [{r.gap_ci_low:+.3f}, {r.gap_ci_high:+.3f}]"
        acc = f"{r.acc_correct_last:.2f} / {r.acc_flipped_last:.2f}"
        lines.append(f"| {r.organism} | {gap} | {acc} | {r.label_heads} | {r.excluded or 'yes'} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    task, sizes = load_task("organism"), Sizes(seed=args.seed)
    models = {name: load_model(name) for name in (*ORGANISMS, *CONSTRUCTED)}
    suite, check = build_suite(models, task, sizes)
    rows = score_methods(suite, task, sizes)
    tab = summary(rows, n_boot=sizes.n_boot, seed=args.seed)
    flips = set(check.organism[check.acc_flipped_last < 0.5])  # follow flipped labels at the last slot
    tab_flip = summary(rows[rows.organism.isin(flips)], n_boot=sizes.n_boot, seed=args.seed)
    built = rows.organism.isin(CONSTRUCTED)  # every head's role known: precision counts only real mistakes
    tab_built = summary(rows[built], n_boot=sizes.n_boot, seed=args.seed)
    wall = time.perf_counter() - t0
    md = "\n\n".join(
        [
            "# Head finding against planted ground truth",
            f"Made by `{COMMAND}` (seed {args.seed}, one torch thread, {wall:.0f} s). "
            f"{len(suite)} organisms; per-organism rows in `finder_ground_truth.csv`.",
            table_markdown(tab),
            "Precision: label heads selected / heads selected (organisms with an empty selection left out); "
            "recall: label heads selected / planted label heads; the last three columns are shares of organisms "
            "(non-label planted heads = class heads, prior carriers, label movers: known on the constructed ones only).",
            f"## The same rows, organisms that follow flipped labels only ({len(set(rows.organism) & flips)})",
            "Accuracy against the true label at the last slot of flipped contexts below 0.5 (suite check table).",
            table_markdown(tab_flip),
            f"## The same rows, constructed organisms only ({rows[built].organism.nunique()}): every head's role known",
            table_markdown(tab_built),
            "## The suite (in-context effect check, its own draw of contexts)",
            check_markdown(check),
            f"Sizes: {sizes}",
        ]
    )
    args.out.mkdir(parents=True, exist_ok=True)
    rows.to_csv(args.out / "finder_ground_truth.csv", index=False)
    (args.out / "finder_ground_truth.md").write_text(md + "\n")
    print(check_markdown(check), "\n")
    print(table_markdown(tab))
    print(f"\nfollowing flipped labels only ({len(set(rows.organism) & flips)} organisms):")
    print(table_markdown(tab_flip))
    print("\nconstructed only:")
    print(table_markdown(tab_built))
    print(f"\n{len(suite)} organisms, {wall:.0f} s")


if __name__ == "__main__":
    main()
