"""`mechicl aggregate`: does a head's output scale with the evidence (the number and placement of flipped
labels), and does adding its "flipped - default" output move the model toward the flipped map?

Three disjoint draws of contexts (``data.batches.stage_draws``): ``select`` chooses the heads (exact patching
of each head's output at the query readout slot, ``head_out_readout``, unless ``--heads`` names them) and gives
the steering vectors; ``fit`` fits the sum / vote / recency / position models; ``eval`` scores those models
held out, gives the curves, and is where the steering is measured. CIs: bootstrap over contexts.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from mechicl.analysis.aggregation.direct import Projections, curves, project_heads
from mechicl.analysis.aggregation.fits import MODELS, fit_all
from mechicl.analysis.aggregation.steering import mean_difference, steer, steering_tables
from mechicl.analysis.aggregation.total import total_effects
from mechicl.analysis.engine.hooks import Head, fmt_heads
from mechicl.analysis.patching.exact import Patcher
from mechicl.analysis.stats import check_draws
from mechicl.data.batches import stage_draws
from mechicl.data.evidence import PLACEMENTS, evidence_batches
from mechicl.data.names import head_name, parse_heads
from mechicl.data.pairs import pair_from_batches
from mechicl.data.task import Task
from mechicl.errors import ConfigError
from mechicl.runs.command import in_folder
from mechicl.runs.folder import Clock, RunFolder
from mechicl.runs.markdown import md_table
from mechicl.viz.aggregation import evidence_curves


@dataclass(frozen=True)
class AggregationConfig:
    """One ``mechicl aggregate`` run. Cost: selection (one head sweep at the readout slot on ``n_select``
    contexts, or none with ``heads``) + one forward per context of each rendering of the fit and eval draws
    (``2 + len(placements) x (k - 1)`` renderings; direct projections) + the total effects (one forward per context
    per draw, then ``len(heads)`` query-token re-runs per context per rendering, ``aggregation_total``) +
    ``len(heads) x len(alphas)`` forwards per eval context (steering)."""

    model: str
    task: str
    n_examples: int = 17
    n_select: int = 16
    n_fit: int = 64
    n_eval: int = 64
    seed: int = 0
    placements: tuple[str, ...] = PLACEMENTS
    heads: tuple[Head, ...] | None = None
    n_heads: int = 4
    alphas: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0, 4.0)
    n_boot: int = 1000
    batch_size: int = 16

    def __post_init__(self) -> None:
        bad = [p for p in self.placements if p not in PLACEMENTS]
        if bad or not self.placements:
            raise ConfigError(f"placements {bad or '(none)'}: use a comma list of {', '.join(PLACEMENTS)}")
        if len(self.alphas) < 2:
            raise ConfigError("--alphas needs at least two values (the slope per unit alpha is fitted across them)")
        check_draws(self.n_boot, "--n-boot")  # before any compute


def choose_heads(model: Any, default: Any, flipped: Any, cfg: AggregationConfig) -> tuple[list[Head], pd.DataFrame]:
    """The ``n_heads`` heads whose output at the query readout slot matters most (|denoise effect|)."""
    table = Patcher(model, pair_from_batches(default, flipped)).sweep("head_out_readout", "denoise").table()
    table = table[["layer", "head", "effect"]].rename(columns={"effect": "readout_effect"})
    n_heads = model.cfg.n_layers * model.cfg.n_heads
    if cfg.heads:
        bad = [h for h in cfg.heads if not (0 <= h[0] < model.cfg.n_layers and 0 <= h[1] < model.cfg.n_heads)]
        if bad:
            raise ConfigError(
                f"--heads {fmt_heads(bad)} not in this model ({model.cfg.n_layers} layers x "
                f"{model.cfg.n_heads} heads = {n_heads})"
            )
        return list(cfg.heads), table
    top = table.assign(a=table["readout_effect"].abs()).sort_values("a", ascending=False).head(cfg.n_heads)
    return [(int(r.layer), int(r.head)) for r in top.itertuples()], table


def fit_heads(fit: Projections, ev: Projections, cfg: AggregationConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every model fitted per head on the fit draw, compared on the eval draw (``measure``: the projections')."""
    params, comparison = [], []
    for i, (l, h) in enumerate(fit.heads):
        p, c = fit_all(
            fit.flips.numpy(),
            fit.delta[..., i].numpy(),
            ev.flips.numpy(),
            ev.delta[..., i].numpy(),
            n_boot=cfg.n_boot,
            seed=cfg.seed,
        )
        params.append(p.assign(head=head_name(l, h), measure=fit.measure))
        comparison.append(c.assign(head=head_name(l, h), measure=fit.measure))
    first = lambda d: d[["head", "measure", *[c for c in d.columns if c not in ("head", "measure")]]]  # noqa: E731
    return first(pd.concat(params, ignore_index=True)), first(pd.concat(comparison, ignore_index=True))


def run_aggregation(loaded: Any, task: Task, cfg: AggregationConfig, out: Path) -> tuple[RunFolder, str]:
    """Select, fit, evaluate and steer; write CSVs, plots and ``summary.md``."""
    clock, folder, model = Clock(), RunFolder(out), loaded.model
    folder.json("config.json", cfg)
    draws = stage_draws(task, {"select": cfg.n_select, "fit": cfg.n_fit, "eval": cfg.n_eval}, cfg.n_examples, cfg.seed)
    kw: dict[str, Any] = dict(n_ctx=loaded.n_ctx, prepend_bos=loaded.prepend_bos, placements=cfg.placements)
    sel = evidence_batches(task, loaded.tokenizer, draws.ids["select"], **kw | {"placements": ()})
    heads, selection = choose_heads(model, sel.default, sel.flipped, cfg)
    vectors = {
        by: mean_difference(model, sel.default, sel.flipped, heads, cfg.batch_size, by_class=by) for by in (False, True)
    }
    folder.csv("selection.csv", selection)
    clock.lap("selection")
    fit_b = evidence_batches(task, loaded.tokenizer, draws.ids["fit"], seed=draws.seeds["fit"], **kw)
    eval_b = evidence_batches(task, loaded.tokenizer, draws.ids["eval"], seed=draws.seeds["eval"], **kw)
    fit_p, eval_p = (project_heads(model, b, heads, cfg.batch_size) for b in (fit_b, eval_b))
    clock.lap("projections")
    fit_t, eval_t = (total_effects(model, b, p, max(cfg.batch_size, 64)) for b, p in ((fit_b, fit_p), (eval_b, eval_p)))
    clock.lap("total effects")
    cur = pd.concat(
        [curves(eval_p, cfg.n_boot, cfg.seed), curves(eval_t, cfg.n_boot, cfg.seed, model_series=False)],
        ignore_index=True,
    )
    params, comparison = (
        pd.concat(t, ignore_index=True) for t in zip(fit_heads(fit_p, eval_p, cfg), fit_heads(fit_t, eval_t, cfg))
    )
    folder.csv("curves.csv", cur)
    folder.csv("fits.csv", params)
    folder.csv("models.csv", comparison)
    clock.lap("fits")
    tables = [
        steering_tables(
            steer(model, eval_b.default, heads, vectors[by], cfg.alphas, cfg.batch_size),
            cfg.n_boot,
            cfg.seed,
            "per_class" if by else "pooled",
        )
        for by in (False, True)
    ]
    per_alpha, slopes = (pd.concat([t[j] for t in tables], ignore_index=True) for j in (0, 1))
    folder.csv("steering.csv", per_alpha)
    folder.csv("steering_slopes.csv", slopes)
    clock.lap("steering")
    evidence_curves(cur, per_alpha, folder.path, loaded.name, cfg.n_eval)
    text = summary(loaded.name, cfg, heads, cur, params, comparison, per_alpha, slopes, clock)
    folder.text("summary.md", text)
    return folder, text


def _cell(e: float, lo: float, hi: float) -> str:
    return f"{e:.3f} [{lo:.3f}, {hi:.3f}]"


def _fit_tables(params: pd.DataFrame, comparison: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The fitted parameters (one column per model parameter) and the held-out model comparison, as cells."""
    p = params.assign(cell=[_cell(*r) for r in params[["estimate", "ci_low", "ci_high"]].to_numpy()])
    keep = {"sum": ["slope"], "vote": ["amplitude", "mid", "width"], "recency": ["weight_last", "decay"]}
    wide = p[[prm in keep.get(m, []) for m, prm in zip(p["model"], p["param"])]]
    wide = wide.assign(col=wide["model"] + " " + wide["param"])
    wide = wide.pivot(index=["head", "measure"], columns="col", values="cell").reset_index()
    comp = comparison.assign(
        excess=[_cell(*r) for r in comparison[["excess_mse", "excess_ci_low", "excess_ci_high"]].to_numpy()]
    )
    return wide, comp[["head", "measure", "model", "n_params", "heldout_r2", "excess", "verdict"]]


def _last_curves(cur: pd.DataFrame, k: int) -> pd.DataFrame:
    """The held-out curves of placement ``last`` at counts 0, k // 2 and k, one column per count."""
    last = cur[(cur["placement"] == "last") & cur["count"].isin([0, k // 2, k])]
    last = last.assign(cell=[_cell(*r) for r in last[["mean", "ci_low", "ci_high"]].to_numpy()])
    last = last.pivot(index=["series", "measure", "query_class"], columns="count", values="cell")
    return last.rename(columns=lambda c: f"m = {c}").reset_index()


def _steering_tables(per_alpha: pd.DataFrame, slopes: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """P(flipped) per steering multiplier (one column per alpha) and the slopes against alpha, as cells."""
    sl = slopes.assign(
        p=[
            _cell(*r)
            for r in slopes[["slope_p_flipped", "slope_p_flipped_ci_low", "slope_p_flipped_ci_high"]].to_numpy()
        ],
        acc=[
            _cell(*r)
            for r in slopes[["slope_acc_flipped", "slope_acc_flipped_ci_low", "slope_acc_flipped_ci_high"]].to_numpy()
        ],
    )
    pa = per_alpha[per_alpha["metric"] == "p_flipped"]
    pa = pa.assign(cell=[_cell(*r) for r in pa[["mean", "ci_low", "ci_high"]].to_numpy()])
    pa = pa.pivot(index=["head", "vector", "query_class"], columns="alpha", values="cell")
    return pa.rename(columns=lambda a: f"alpha = {a:g}"), sl


def summary(
    name: str,
    cfg: AggregationConfig,
    heads: list[Head],
    cur: pd.DataFrame,
    params: pd.DataFrame,
    comparison: pd.DataFrame,
    per_alpha: pd.DataFrame,
    slopes: pd.DataFrame,
    clock: Clock,
) -> str:
    """The run's ``summary.md``."""
    k = cfg.n_examples - 1
    wide, comp = _fit_tables(params, comparison)
    last = _last_curves(cur, k)
    pa, sl = _steering_tables(per_alpha, slopes)
    lines = [
        f"# Evidence aggregation: {name} on {cfg.task}",
        "",
        f"k = {k} demonstrations. Heads {fmt_heads(heads)} ({'given' if cfg.heads else 'chosen by |head_out_readout| on the select draw'}; "
        f"{cfg.n_select} contexts), models fitted on {cfg.n_fit} contexts and scored on {cfg.n_eval} held-out contexts "
        f"(disjoint task rows; seed {cfg.seed}). Measure `direct` = the head's direct effect on logit(flipped) - "
        f"logit(true) at the query readout slot, minus the same context with no label flipped; `total` = the change "
        f"of the model's logit(flipped) - logit(true) there when the head's output at that slot is patched from the "
        f"rendering into the same context with no label flipped (later MLPs and heads recomputed); `model` = the "
        f"model's own answer (`ld_flipped`: its change from m = 0). 95% bootstrap CIs over contexts "
        f"({cfg.n_boot} draws).",
        "",
        f"## Held-out curves, placement `last` (counts 0, {k // 2}, {k}; all queries and per query class)",
        "",
        md_table(last),
        "",
        f"## Fitted parameters (fit draw; models: {', '.join(MODELS)})",
        "",
        md_table(wide),
        "",
        "## Model comparison on the held-out draw (excess MSE over the best model; verdict = simplest model whose "
        "excess CI reaches 0)",
        "",
        md_table(comp),
        "",
        "## Steering: P(flipped label) in default-label contexts, alpha x the head's mean flipped - default output "
        "(`pooled`: one mean over the select draw; `per_class`: the mean over queries of the same true class)",
        "",
        md_table(pa.reset_index()),
        "",
        md_table(
            sl[["head", "vector", "vector_norm", "p", "acc"]].rename(
                columns={"p": "dP(flipped)/dalpha", "acc": "d top-1 flipped/dalpha"}
            )
        ),
        "",
        clock.line(),
    ]
    return "\n".join(lines) + "\n"


def command(args: argparse.Namespace) -> int:
    """`mechicl aggregate`: head projections vs the count and placement of flipped labels; steering check."""
    cfg = AggregationConfig(
        args.model,
        args.task,
        args.k + 1,
        args.n_select,
        args.n_fit,
        args.n_eval,
        args.seed,
        tuple(p.strip() for p in args.placements.split(",") if p.strip()),
        parse_heads(args.heads) if args.heads else None,
        args.n_heads,
        args.alphas,
        args.n_boot,
        args.batch_size,
    )
    return in_folder(args, "aggregate", lambda m, t, out: run_aggregation(m, t, cfg, out)[1])
