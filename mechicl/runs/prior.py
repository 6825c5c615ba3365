"""`mechicl prior`: how in-context labels compete with the zero-shot prior, per query and per head (issue 28).

Every readout slot k >= --k-min of ``--n-contexts`` contexts is a query with its own prior strength (the model's
zero-shot log-odds for its true class); slots are binned by it and by k, and per bin the run reports behaviour
(P(true) with correct and flipped labels; how often flipped labels fail to move the answer off the true class)
and, for each ``--heads`` set, the label information the heads carry there (interchange at the slot). Method and
conventions: ``analysis.prior.moderation`` and ``docs/prior.md``.
"""

from __future__ import annotations

import argparse
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from mechicl.analysis.engine.hooks import Head
from mechicl.analysis.engine.stepper import ReadoutStepper
from mechicl.analysis.heads.ablation import HeadAblation
from mechicl.analysis.prior.moderation import BINS, moderation, prior_strength
from mechicl.analysis.prior.routes import route_patch, route_table
from mechicl.data.batches import zero_shot_batch
from mechicl.data.names import head_name, parse_heads
from mechicl.data.optimal_reader import evidence_flip_scale
from mechicl.data.task import Task
from mechicl.errors import ConfigError
from mechicl.models.base import LoadedModel
from mechicl.models.organism import organism_config
from mechicl.runs.command import in_folder
from mechicl.runs.folder import Clock, RunFolder
from mechicl.runs.inside_batches import InsideConfig, finish, header, inside_config
from mechicl.runs.markdown import md_table
from mechicl.runs.prior_heads import dose_tables, prior_draws, prior_heads_tables
from mechicl.runs.prior_summary import HOW_TO_READ, prior_lines, routes_summary, slots_summary
from mechicl.viz.prior import competition_figure, dose_figure, prior_figures


def head_sets(text: str, n_layers: int, n_heads: int) -> list[list[tuple[int, int]]]:
    """``"L11H2;L15H0,L15H2"`` -> one set per ``;``-separated group (a group may hold several heads)."""
    sets = [list(parse_heads(g)) for g in text.split(";") if g.strip()]
    if not sets:
        raise ConfigError("--heads names no head; e.g. --heads 'L11H2;L15H0' (find them with `mechicl heads`)")
    bad = [head_name(l, h) for s in sets for l, h in s if not (0 <= l < n_layers and 0 <= h < n_heads)]
    if bad:
        raise ConfigError(f"--heads {bad} are not in this model ({n_layers} layers x {n_heads} heads)")
    return sets


def prior_spec(text: str, n_layers: int, n_heads: int) -> tuple[bool, list[Head]]:
    """``--prior-heads``: ``;``-separated groups, "find" (the finder selects) and/or head names -> (find, named)."""
    groups = [g.strip() for g in text.split(";") if g.strip()]
    names = ";".join(g for g in groups if g != "find")
    return "find" in groups, ([x for s in head_sets(names, n_layers, n_heads) for x in s] if names else [])


@dataclass
class PriorTables:
    """Everything `mechicl prior` measures (``analysis.prior``), each a tidy table with CIs."""

    moderation: pd.DataFrame  # head set x prior bin x k band
    routes: pd.DataFrame  # route x prior bin (or "all") x k band
    dose: pd.DataFrame  # head set x k band x dose
    prior_select: pd.DataFrame  # the prior-head finder's confirmation table (empty for named heads)
    prior_heads: pd.DataFrame  # validated prior-head candidates (empty without --prior-heads)


def compute_prior(
    loaded: LoadedModel,
    task: Task,
    cfg: InsideConfig,
    sets: list[list[Head]],
    find: bool = False,
    named: Sequence[Head] = (),
    n_boot: int = 2000,
    exclude: Collection[int] = (),
) -> PriorTables:
    """All of `mechicl prior` on the validate draw (``runs.prior_heads.prior_draws``); prior heads (``prior_spec``):
    ``find`` (the finder selects on the screen/confirm draws) and/or ``named`` (validated as given, beside the
    finder's); neither: none. ``exclude``: task rows no draw may hold (the report passes the rows its head finder
    selected and validated on, so the heads it names are measured here on rows that never chose them).

    Cost: the zero-shot queries (one short forward each), two forwards per context, per label set ``2 x S`` one-token
    steps per context (moderation) + ``S`` (routes) + ``6 S`` (dose), 4 route runs of ``S`` steps, and with prior
    heads the finder's zero-shot re-runs, their roles and ``6 S`` steps each for the dose (S = slots from k_min)."""
    d = prior_draws(loaded, task, cfg.n_contexts, cfg.n_examples, cfg.seed, exclude)
    bd, bf = d.correct, d.flipped
    zs = zero_shot_batch(task, loaded.tokenizer, bd, n_ctx=loaded.n_ctx, prepend_bos=loaded.prepend_bos)
    strength = prior_strength(ReadoutStepper(loaded.model, zs)).reshape(bd.example_ids.shape)[:, cfg.k_min :]
    abl = HeadAblation(loaded.model, bd, bf, cfg.k_min, mode="interchange", seed=cfg.seed)
    bands = k_bands(cfg.k_min, cfg.n_examples - 1)
    kw = dict(bins=BINS, k_groups=bands, n_boot=n_boot, seed=cfg.seed)
    mod = moderation(abl, sets, strength, **kw)
    res = route_patch(abl.st["correct"], abl.st["flipped"], through=sets)
    if res.check() > 1e-3:
        raise RuntimeError(f"route patching's 'all' route differs from the flipped run by {res.check():.3g}")
    routes = pd.concat([route_table(res, None, **kw), route_table(res, strength, **kw)], ignore_index=True)
    named = list(named)
    select, val = (
        prior_heads_tables(loaded, d, abl, find, named, cfg.seed, n_boot)
        if find or named
        else (pd.DataFrame(), pd.DataFrame())
    )
    found = [parse_heads(h)[0] for h in (val.heads[val.prior_head] if "prior_head" in val else [])]
    prior_sets = [[x] for x in dict.fromkeys(found + named)]  # named heads get their dose whatever their verdict
    dose = dose_tables(abl, sets, prior_sets, bands, cfg.seed, n_boot)
    return PriorTables(mod, routes, _with_bayes(dose, loaded.name), select, val)


def _with_bayes(dose: pd.DataFrame, model: str) -> pd.DataFrame:
    """On an organism, the Bayes-optimal reader's evidence flip factor at each band's first k beside the curves."""
    org = organism_config(model)
    if org is None or not len(dose):
        return dose
    return dose.assign(bayes_flip=[evidence_flip_scale(org.language, int(k)) for k in dose.k_lo])


def k_bands(k_min: int, k_max: int) -> list[tuple[int, int]]:
    """Doubling bands of k from ``k_min`` (1, 2-3, 4-7, 8-15, ...), cut at ``k_max``: enough queries per bin."""
    out, lo = [], max(k_min, 1)
    while lo <= k_max:
        hi = min(2 * lo - 1 if lo > 1 else 1, k_max)
        out.append((lo, hi))
        lo = hi + 1
    return out if k_min >= 1 else [(0, 0), *out]


def report_prior(loaded: LoadedModel, task: Task, cfg: InsideConfig, heads: str, prior: str, out: Path) -> str:
    clock, folder = Clock(), RunFolder(out)
    L, H = int(loaded.model.cfg.n_layers), int(loaded.model.cfg.n_heads)
    sets, (find, named) = head_sets(heads, L, H), prior_spec(prior, L, H)  # bad names fail before any compute
    t = compute_prior(loaded, task, cfg, sets, find, named)
    clock.lap("prior")
    for name in ("moderation", "routes", "dose", "prior_select", "prior_heads"):
        if len(getattr(t, name)):
            folder.csv("prior.csv" if name == "moderation" else f"{name}.csv", getattr(t, name))
    title = f"{loaded.name} / {cfg.task}"
    prior_figures(t.moderation, folder.path, title)
    competition_figure(
        t.routes[t.routes.prior_bin != "all"], t.moderation, folder.path / "prior_competition.png", title
    )
    if len(t.dose):
        dose_figure(t.dose, folder.path / "prior_dose.png", title)
    lines = header("Prior vs in-context labels", loaded, cfg, HOW_TO_READ)
    lines += ["## Per prior bin and k", "", md_table(slots_summary(t.moderation)), ""]
    lines += ["## Routes into the readout slot (share of the logit gap)", "", md_table(routes_summary(t.routes)), ""]
    lines += prior_lines(t)
    return finish(folder, cfg, lines, clock)


def command(args: argparse.Namespace) -> int:
    """`mechicl prior`: behaviour and head-level label information per bin of the query's zero-shot prior."""
    cfg = inside_config(args)
    if not args.heads:
        raise ConfigError("--heads is required, e.g. --heads 'L11H2;L15H0' (the validated heads of `mechicl heads`)")
    return in_folder(args, "prior", lambda m, t, out: report_prior(m, t, cfg, args.heads, args.prior_heads, out))
