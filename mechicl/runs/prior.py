"""`mechicl prior`: how in-context labels compete with the zero-shot prior, per query and per head (issue 28).

Every readout slot k >= --k-min of ``--n-contexts`` contexts is a query with its own prior strength (the model's
zero-shot log-odds for its true class); slots are binned by it and by k, and per bin the run reports behaviour
(P(true) with correct and flipped labels; how often flipped labels fail to move the answer off the true class)
and, for each ``--heads`` set, the label information the heads carry there (interchange at the slot). Method and
conventions: ``analysis.prior.moderation`` and ``docs/prior.md``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from mechicl.analysis.engine.stepper import ReadoutStepper
from mechicl.analysis.heads.ablation import HeadAblation
from mechicl.analysis.prior.moderation import BINS, moderation, prior_strength
from mechicl.analysis.prior.routes import route_patch, route_table
from mechicl.data.batches import zero_shot_batch
from mechicl.data.names import parse_heads
from mechicl.data.task import Task
from mechicl.errors import ConfigError
from mechicl.models.base import LoadedModel
from mechicl.runs.command import in_folder
from mechicl.runs.folder import Clock, RunFolder
from mechicl.runs.inside_batches import InsideConfig, default_and_flipped, finish, header, inside_config
from mechicl.runs.markdown import md_table
from mechicl.viz.prior import competition_figure, prior_figures


def head_sets(text: str, n_layers: int, n_heads: int) -> list[list[tuple[int, int]]]:
    """``"L11H2;L15H0,L15H2"`` -> one set per ``;``-separated group (a group may hold several heads)."""
    sets = [list(parse_heads(g)) for g in text.split(";") if g.strip()]
    if not sets:
        raise ConfigError("--heads names no head; e.g. --heads 'L11H2;L15H0' (find them with `mechicl heads`)")
    bad = [f"L{l}H{h}" for s in sets for l, h in s if not (0 <= l < n_layers and 0 <= h < n_heads)]
    if bad:
        raise ConfigError(f"--heads {bad} are not in this model ({n_layers} layers x {n_heads} heads)")
    return sets


def compute_prior(
    loaded: LoadedModel, task: Task, cfg: InsideConfig, sets: list[list[tuple[int, int]]], bins=BINS, n_boot=2000
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The moderation table (``analysis.prior.moderation.moderation``, one row per set x bin x k band) and the route
    table (``analysis.prior.routes``, one row per route x bin x k band, the label route also through each set).

    Cost: one zero-shot forward per example (short prompts), two forwards per context, per set ``2 x S`` one-token
    steps per context for the moderation and ``S`` for the routes, and 4 route runs of ``S`` steps (S = slots from
    k_min)."""
    bd, bf = default_and_flipped(loaded, task, cfg)
    zs = zero_shot_batch(task, loaded.tokenizer, bd, n_ctx=loaded.n_ctx, prepend_bos=loaded.prepend_bos)
    prior = prior_strength(ReadoutStepper(loaded.model, zs)).reshape(bd.example_ids.shape)[:, cfg.k_min :]
    abl = HeadAblation(loaded.model, bd, bf, cfg.k_min, mode="interchange", seed=cfg.seed)
    bands = k_bands(cfg.k_min, cfg.n_examples - 1)
    mod = moderation(abl, sets, prior, bins=bins, k_groups=bands, n_boot=n_boot, seed=cfg.seed)
    res = route_patch(abl.st["correct"], abl.st["flipped"], through=sets)
    if res.check() > 1e-3:
        raise RuntimeError(f"route patching's 'all' route differs from the flipped run by {res.check():.3g}")
    kw = dict(bins=bins, k_groups=bands, n_boot=n_boot, seed=cfg.seed)
    routes = pd.concat([route_table(res, None, **kw), route_table(res, prior, **kw)], ignore_index=True)
    return mod, routes


def k_bands(k_min: int, k_max: int) -> list[tuple[int, int]]:
    """Doubling bands of k from ``k_min`` (1, 2-3, 4-7, 8-15, ...), cut at ``k_max``: enough queries per bin."""
    out, lo = [], max(k_min, 1)
    while lo <= k_max:
        hi = min(2 * lo - 1 if lo > 1 else 1, k_max)
        out.append((lo, hi))
        lo = hi + 1
    return out if k_min >= 1 else [(0, 0), *out]


def _summary_table(tab: pd.DataFrame) -> pd.DataFrame:
    ci = lambda r, c: f"{r[c]:+.3f} [{r[c + '_ci_low']:+.2f}, {r[c + '_ci_high']:+.2f}]"  # noqa: E731
    return pd.DataFrame(
        {
            "heads": tab.heads,
            "k": [f"{a}" if a == b else f"{a}-{b}" for a, b in zip(tab.k_lo, tab.k_hi)],
            "zero-shot log-odds": tab.prior_bin,
            "queries (contexts)": [f"{a} ({b})" for a, b in zip(tab.n_slots, tab.n_contexts)],
            "P(true) correct / flipped": [f"{a:.2f} / {b:.2f}" for a, b in zip(tab.p_correct, tab.p_flipped)],
            "flipped: still answers the true class": [ci(r, "sides_with_prior") for _, r in tab.iterrows()],
            "heads' label information (ΔP flipped - ΔP correct)": [ci(r, "closed") for _, r in tab.iterrows()],
        }
    )


def _routes_table(routes: pd.DataFrame) -> pd.DataFrame:
    """One row per k band and prior bin, one column per route: share of the logit gap with its CI."""
    t = routes.assign(
        k=[f"{a}" if a == b else f"{a}-{b}" for a, b in zip(routes.k_lo, routes.k_hi)],
        cell=[f"{s:+.2f} [{lo:+.2f}, {hi:+.2f}]" for s, lo, hi in zip(routes.share, routes.ci_low, routes.ci_high)],
    )
    wide = t.pivot_table(index=["k", "k_lo", "prior_bin"], columns="route", values="cell", aggfunc="first", sort=False)
    gaps = t.drop_duplicates(["k", "prior_bin"]).set_index(["k", "k_lo", "prior_bin"])[["gap", "n_slots"]]
    wide = wide.join(gaps).reset_index()  # pooled k bands first, then each prior bin's
    cols = [c for c in ("labels", "query", "rest", "interaction") if c in wide] + [
        c for c in wide if str(c).startswith("labels via")
    ]
    out = wide[["prior_bin", "k", "n_slots", "gap", *cols]].rename(
        columns={"prior_bin": "zero-shot log-odds", "n_slots": "queries", "gap": "logit gap (correct - flipped)"}
    )
    return out.assign(**{"logit gap (correct - flipped)": out["logit gap (correct - flipped)"].map("{:+.2f}".format)})


def report_prior(loaded: LoadedModel, task: Task, cfg: InsideConfig, heads: str, out: Path) -> str:
    clock, folder = Clock(), RunFolder(out)
    sets = head_sets(heads, int(loaded.model.cfg.n_layers), int(loaded.model.cfg.n_heads))
    tab, routes = compute_prior(loaded, task, cfg, sets)
    clock.lap("prior")
    folder.csv("prior.csv", tab)
    folder.csv("routes.csv", routes)
    title = f"{loaded.name} / {cfg.task}"
    prior_figures(tab, folder.path, title)
    competition_figure(routes[routes.prior_bin != "all"], tab, folder.path / "prior_competition.png", title)
    lines = header(
        "Prior vs in-context labels",
        loaded,
        cfg,
        "Prior strength = the model's zero-shot log-odds for the query's true class (k = 0). Per bin of prior "
        "strength and k: P(true) with correct and with flipped labels, the share of flipped-label queries still "
        "answered with the true class (the prior wins), and each head set's label information: ΔP(true) when its "
        "output at the slot is swapped with the other condition's (flipped minus correct; 0 = it carries none). "
        "Routes: the logit difference (true - flipped label) lost when the readout slot reads the flipped "
        "rendering's keys and values at the label tokens, at the query's own input tokens or at the rest, as a "
        "share of the whole gap. 95% CIs: cluster bootstrap over contexts.",
    )
    lines += ["## Per prior bin and k", "", md_table(_summary_table(tab)), ""]
    lines += ["## Routes into the readout slot (share of the logit gap)", "", md_table(_routes_table(routes)), ""]
    return finish(folder, cfg, lines, clock)


def command(args: argparse.Namespace) -> int:
    """`mechicl prior`: behaviour and head-level label information per bin of the query's zero-shot prior."""
    cfg = inside_config(args)
    if not args.heads:
        raise ConfigError("--heads is required, e.g. --heads 'L11H2;L15H0' (the validated heads of `mechicl heads`)")
    return in_folder(args, "prior", lambda m, t, out: report_prior(m, t, cfg, args.heads, out))
