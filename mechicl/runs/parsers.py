"""Each command's flags (the shared ones come from ``runs.args``); ``mechicl.cli.parser`` names the commands
and ``mechicl.cli.dispatch`` runs each. Imports nothing heavy: ``mechicl --help`` answers without torch.

Defaults of ``--k`` differ by command because their costs do (the help of each says which); its meaning
does not: k observed demonstrations + 1 query per context.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from mechicl.analysis.heads.modes import ABLATION_MODES, FINDINGS_DEFAULT
from mechicl.analysis.patching.kinds import KINDS
from mechicl.runs.args import (
    add_batch_size,
    add_k,
    add_model_task,
    add_multi_token,
    add_run_args,
    fraction,
    head_list,
    int_at_least,
    set_sizes,
)

CONDITIONS_HELP = (
    "comma list of label conditions: default, random, flipped, arbitrary[:w1/w2] (replacement label words, "
    "default A/B), and mid-context switches a>b@N (map a for examples 0..N-1, then b, e.g. "
    "default>flipped@8) or a>b@alt (alternate every example)"
)

from mechicl.runs.parsers_findings import findings_args  # noqa: E402,F401 - the grid's flags live beside it

MULTI_TOKEN = {"demo", "behavior", "run"}  # commands that score labels as whole token sequences (--multi-token)


def behavior_args(p: argparse.ArgumentParser, conditions: str = "default,random,flipped") -> None:
    """``demo`` and ``behavior``: accuracy, log-likelihood and entropy against k."""
    add_model_task(p)
    p.add_argument("--conditions", default=conditions, help=f"{CONDITIONS_HELP} (default {conditions})")
    add_k(p, 16, curve=True)
    p.add_argument("--n-contexts", type=int_at_least(2), default=64, help="context draws per condition (default 64)")
    add_batch_size(p, 8)
    add_multi_token(p)
    add_run_args(p)


def run_args(p: argparse.ArgumentParser) -> None:
    """``run <config.toml>``: every flag overrides the config's value."""
    p.add_argument("config", type=Path, help="TOML experiment config, e.g. experiments/nh1_random_labels.toml")
    p.add_argument("--model", default=None, help="override the config's model (name or path; see `mechicl models`)")
    p.add_argument(
        "--task", default=None, help="override the config's task (name or .csv/.jsonl path; see `mechicl tasks`)"
    )
    add_k(p, None, curve=True)
    p.add_argument("--n-contexts", type=int_at_least(2), default=None, help="override the number of context draws")
    add_batch_size(p, None)
    add_multi_token(p)
    add_run_args(p, seed=None)


def inside_args(p: argparse.ArgumentParser, n_contexts: int = 32) -> None:
    """``attention``, ``lens``, ``dla``: default vs flipped contexts, every readout slot with k >= --k-min."""
    add_model_task(p)
    p.add_argument(
        "--n-contexts", type=int_at_least(2), default=n_contexts, help=f"contexts per condition (default {n_contexts})"
    )
    add_k(p, 15, note="; the readout slots of examples 0..k are all scored")
    p.add_argument(
        "--k-min",
        type=int_at_least(1),
        default=4,
        help="average over readout slots with >= k-min earlier examples (at most --k; default 4)",
    )
    add_batch_size(p, 8)
    p.add_argument("--top", type=int_at_least(1), default=10, help="rows in the printed top lists (default 10)")
    add_run_args(p)


def prior_args(p: argparse.ArgumentParser) -> None:
    """``prior``: the shared inside flags (contexts, k, k-min) and the head sets whose label information is binned."""
    inside_args(p)
    p.add_argument(
        "--heads",
        default=None,
        help="head sets, ';' between sets and ',' within one, e.g. 'L11H2;L15H0,L15H2' (required; see `mechicl heads`)",
    )
    p.add_argument(
        "--prior-heads",
        default="",
        help="prior heads, ';'-separated: 'find' (selected on two draws of task rows, validated on the third) and/or "
        "head names validated as given, e.g. 'find;L11H3;L13H3' (default: none)",
    )


def attention_args(p: argparse.ArgumentParser) -> None:
    """``attention``: the shared inside flags and whether to run the saliency backward passes."""
    inside_args(p)
    p.add_argument("--no-saliency", action="store_true", help="skip the attention-saliency backward passes")


def lens_args(p: argparse.ArgumentParser) -> None:
    """``lens``: the shared inside flags and the gap that marks the critical layer."""
    inside_args(p)
    p.add_argument(
        "--min-gap", type=fraction, default=0.05, help="accuracy gap that marks the critical layer (default 0.05)"
    )


def pair_args(p: argparse.ArgumentParser, batch_size: int, top: int, top_help: str) -> None:
    """The flags of commands that compare correct- with flipped-label renderings of the same contexts (a pair)."""
    p.add_argument("--n-contexts", type=int_at_least(1), default=4, help="contexts (default 4)")
    add_k(p, 7)
    p.add_argument(
        "--last-m",
        type=int_at_least(1),
        default=None,
        help="flip only the last m demonstration labels (default: all k)",
    )
    add_batch_size(p, batch_size)
    p.add_argument("--top", type=int_at_least(1), default=top, help=f"{top_help} (default {top})")


def patch_args(p: argparse.ArgumentParser) -> None:
    add_model_task(p)
    p.add_argument(
        "--kinds",
        default="resid,head_out",
        help=f"comma list of {', '.join(KINDS)} (default resid,head_out)",
    )
    p.add_argument(
        "--direction",
        choices=["denoise", "noise", "both"],
        default="both",
        help="denoise = clean into corrupted, noise = corrupted into clean (default both)",
    )
    pair_args(p, 64, 5, "cells listed per sweep in the summary")
    add_run_args(p)


def heads_args(p: argparse.ArgumentParser) -> None:
    """One `mechicl findings` cell (defaults = the grid's): screen -> confirm -> validate on disjoint draws."""
    add_model_task(p)
    add_k(p, 16, note="; readout slots k_min..k are measured")
    p.add_argument("--k-min", type=int_at_least(0), default=None, help="first readout slot measured (default k // 2)")
    for flag, default, what in [
        ("n-screen", 8, "screening"),
        ("n-confirm", 24, "confirmation"),
        ("n-eval", 32, "validation"),
    ]:
        p.add_argument(
            f"--{flag}", type=int_at_least(4), default=default, help=f"contexts of the {what} draw (default {default})"
        )
    p.add_argument("--candidates", type=int_at_least(1), default=8, help="screened heads confirmed exactly (default 8)")
    p.add_argument(
        "--n-top", type=int_at_least(1), default=3, help="confirmed heads validated against controls (default 3)"
    )
    p.add_argument(
        "--n-control", type=int_at_least(1), default=5, help="matched control heads per validated head (default 5)"
    )
    p.add_argument(
        "--ablation",
        choices=ABLATION_MODES,
        default=FINDINGS_DEFAULT,  # chosen by the ground-truth benchmark (docs/results/finder_ground_truth.md)
        help=f"head ablation at the readout slots (default {FINDINGS_DEFAULT})",
    )
    add_run_args(p)


def attribute_args(p: argparse.ArgumentParser) -> None:
    add_model_task(p)
    p.add_argument(
        "--steps", type=int_at_least(1), default=20, help="Riemann steps (midpoint rule) of both IGs (default 20)"
    )
    p.add_argument(
        "--completeness-steps",
        type=set_sizes,
        default=(1, 5, 20, 50),
        help="step counts at which path-IG completeness is reported (default 1,5,20,50)",
    )
    p.add_argument(
        "--metric",
        choices=["logit_diff", "prob"],
        default="logit_diff",
        help="AttAttr metric at the query slot: shown-label logit difference or P(shown label) (default logit_diff)",
    )
    p.add_argument(
        "--baseline",
        choices=["uniform", "zero"],
        default="uniform",
        help="AttAttr path start: uniform causal attention, or 0 * A as in Hao et al. (degenerate with a "
        "post-attention norm, e.g. Gemma-3; default uniform)",
    )
    # 8 rows a forward, as report: at 32 the AttAttr backward took `attribute` on gemma3-270m to 5.87 GB (issue 31)
    pair_args(p, 8, 10, "heads listed; k of the top-k overlap")
    p.add_argument("--view-heads", type=int_at_least(1), default=4, help="heads in attribution_view.html (default 4)")
    add_run_args(p)


def circuit_args(p: argparse.ArgumentParser) -> None:
    add_model_task(p)
    add_k(p, 8)
    for flag, default, low, what in (
        ("--n-select", 8, 1, "contexts that choose the heads"),
        ("--n-eval", 16, 2, "held-out contexts for every reported number"),
        ("--senders", 4, 1, "sender heads on large models"),
        ("--receivers", 4, 1, "receiver heads on large models"),
        ("--seed-eval", 1, 0, "seed of the held-out contexts"),
    ):
        p.add_argument(flag, type=int_at_least(low), default=default, help=f"{what} (default {default})")
    p.add_argument(
        "--positions", default="label,all", help="sender positions: comma list of label, input, readout, all"
    )
    p.add_argument(
        "--threshold", type=float, default=0.05, help="smallest |path effect| drawn as an edge (default 0.05)"
    )
    for flag, what in (("--sender-heads", "senders"), ("--receiver-heads", "receivers")):
        p.add_argument(
            flag,
            default=None,
            help=f"pre-registered {what}, e.g. 'L10H3' (with the other flag; no selection draw is used)",
        )
    add_run_args(p)  # --seed (of the selection contexts), --threads, --out, --overwrite, --label-names, --template


def float_list(text: str) -> tuple[float, ...]:
    """``--alphas``: comma-separated numbers."""
    try:
        vals = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated numbers, e.g. 0,0.5,1,2,4; got {text!r}") from None
    if not vals:
        raise argparse.ArgumentTypeError(f"must be one or more comma-separated numbers; got {text!r}")
    if not all(math.isfinite(v) for v in vals):  # nan/inf steering gives NaN tables
        raise argparse.ArgumentTypeError(f"must be finite numbers (no nan or inf), e.g. 0,0.5,1,2,4; got {text!r}")
    return vals


def aggregate_args(p: argparse.ArgumentParser) -> None:
    """``aggregate``: head projections against the count and placement of flipped labels; steering."""
    add_model_task(p)
    add_k(p, 16, lo=2)  # k = 1 has no placement of flipped labels to compare (it failed after compute)
    for flag, default, low, what in (
        ("--n-select", 16, 2, "contexts that choose the heads and the steering vectors"),
        ("--n-fit", 64, 2, "contexts the models are fitted on"),
        ("--n-eval", 64, 2, "held-out contexts: curves, model comparison, steering"),
        ("--n-heads", 4, 1, "heads chosen when --heads is not given"),
        ("--n-boot", 1000, 0, "bootstrap draws over contexts"),
    ):
        p.add_argument(flag, type=int_at_least(low), default=default, help=f"{what} (default {default})")
    p.add_argument(
        "--heads",
        type=head_list,
        default=None,
        help="heads to measure, e.g. L1H1,L0H2 (default: chosen on the select draw)",
    )
    p.add_argument(
        "--placements",
        default="last,first,spread,random",
        help="where the flipped labels sit: comma list of last, first, spread, random (default all four)",
    )
    p.add_argument(
        "--alphas",
        type=float_list,
        default=(0.0, 0.5, 1.0, 2.0, 4.0),
        help="steering multipliers of the mean flipped - default head output (default 0,0.5,1,2,4)",
    )
    add_batch_size(p, 16)
    add_run_args(p)  # --seed (of the three disjoint draws), --threads, --out, --overwrite, --label-names, --template


def report_args(p: argparse.ArgumentParser) -> None:
    add_model_task(p)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="tiny sizes (seconds on tiny models; for tests)")
    size.add_argument("--full", action="store_true", help="paper-grade sizes (much slower)")
    p.add_argument(
        "--arbitrary",
        default=None,
        help="label words of the arbitrary condition, one per class "
        "(default: one capital letter per class, A/B for two classes)",
    )
    p.add_argument(
        "--no-attribution",
        dest="attribution",
        action="store_false",
        help="leave attention attribution (AttAttr) out of 'Who looks at labels' (saves its stage's time)",
    )
    p.add_argument(
        "--findings",
        default=None,
        metavar="DIR",
        help="a finished `mechicl findings` grid folder: its head verdicts for this model fill section 7",
    )
    p.add_argument(
        "--circuit",
        default=None,
        metavar="DIR",
        help="a `mechicl circuit` run folder on this model: its path effects and circuit figure fill section 7",
    )
    add_batch_size(p, 8)
    add_run_args(p)
