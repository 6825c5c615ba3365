"""`mechicl report`: every analysis on one model and task, written as one self-contained offline report.html.

Stages (each timed, its forwards counted): behaviour curves and the NH tests on them; attention (label
attention, PM, induction, saliency); logit lens; DLA / prior vs context; exact and attribution patching;
the held-out head finder (one `mechicl heads` cell: screen, confirm, validate against matched controls).
Each reuses the compute step of its own command (``runs.behavior``, ``runs.attention``, ``runs.inside``, ``runs.patch``, ``runs.heads``); the sections and
their captions are built in ``runs.report_sections`` and assembled by ``viz.report_html``.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import pandas as pd

from mechicl.analysis.behavior.curves import BehaviorConfig, BehaviorResult
from mechicl.analysis.behavior.hypotheses import run_tests
from mechicl.analysis.engine.hooks import act_name
from mechicl.analysis.engine.surgery import count_block_calls
from mechicl.analysis.patching.attribution import agreement, attribution_patch
from mechicl.analysis.patching.exact import Patcher
from mechicl.data.batches import used_rows
from mechicl.data.names import head_name, parse_head
from mechicl.data.pairs import pair_for, pair_from_batches
from mechicl.data.task import Task
from mechicl.models.base import LoadedModel
from mechicl.models.machine import peak_rss_gb
from mechicl.runs import report_sections as S
from mechicl.runs.attention import compute_attention
from mechicl.runs.attribute import AttributeConfig, attattr_both, attattr_groups
from mechicl.runs.behavior import run_behavior
from mechicl.runs.behavior_optimal_reader import bayes_reference
from mechicl.runs.command import in_folder
from mechicl.runs.dla import compute_dla
from mechicl.runs.folder import Clock, RunFolder
from mechicl.runs.heads import TABLES, find_heads_for
from mechicl.runs.inside_batches import InsideConfig, Runs, shared_runs
from mechicl.runs.lens import compute_lens
from mechicl.runs.prior import PriorTables, compute_prior
from mechicl.runs.report_agreement import with_agreement
from mechicl.runs.report_circuit import check_external, circuit_stage
from mechicl.runs.report_data import NHTest, PatchStage, ReportConfig, ReportData, arbitrary_words, headline_heads
from mechicl.runs.report_guides import with_guides
from mechicl.runs.report_headline import committed_replication, headline_section, with_competition
from mechicl.runs.run import load_config, verdict_markdown
from mechicl.viz.report_html import Table, render_report

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"
NH_CONFIGS = ("nh1_random_labels.toml", "nh2_flipped_arbitrary.toml")
FIGURE_DPI = {"savefig.dpi": 180}  # the report's PNGs fill a 1000-px column: drawn at 5.6 in, 120 dpi would be upscaled


def patch_cache_names(model: Any) -> list[str]:
    """What the exact sweeps (``ReportConfig.patch_kinds``) cache of each run: every layer's head outputs and
    residual."""
    return [act_name(k, l) for k in ("z", "resid_pre") for l in range(model.cfg.n_layers)]


@dataclass
class Stages:
    """Wall seconds and forward passes per stage. A forward = one call of the model's last block (a partial
    re-run that starts mid-model or only runs the query token counts as one); ``rows`` = contexts in those calls;
    ``peak_rss_gb`` = the process's peak resident memory so far (it only grows: the stage where it jumps set it)."""

    model: Any
    progress: bool = True
    rows: list[dict] = dataclasses.field(default_factory=list)

    @contextmanager
    def stage(self, name: str, contexts: str) -> Iterator[None]:
        t0 = time.perf_counter()
        with count_block_calls(self.model) as n:
            yield
        s = time.perf_counter() - t0
        rss = peak_rss_gb()
        self.rows.append(
            {
                "stage": name,
                "contexts": contexts,
                "seconds": s,
                "forwards": n["calls"],
                "rows": n["rows"],
                "peak_rss_gb": rss,
            }
        )
        if self.progress:
            print(
                f"[report] {name}: {s:.1f} s, {n['calls']} forwards ({contexts}); peak RSS so far {rss:.2f} GB",
                flush=True,
            )

    def table(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows)


def nh_tests(beh: BehaviorResult, cfg: ReportConfig, model: str) -> list[NHTest]:
    """The primary tests of experiments/nh1 and nh2 whose conditions the report scored (no extra forwards)."""
    have = set(beh.raw.condition)
    out = []
    for name in NH_CONFIGS:
        base = load_config(EXPERIMENTS / name, model=model)
        keep = []
        for t in base.tests:
            ks = None if t.ks is None else tuple(k for k in t.ks if k <= cfg.k_max) or (cfg.k_max,)
            if t.primary and {t.a.split("/")[0], t.b.split("/")[0]} <= have:
                keep.append(dataclasses.replace(t, ks=ks))
        if not keep:
            continue
        ec = dataclasses.replace(
            base, task=cfg.task, n_contexts=cfg.n_behavior, k_max=cfg.k_max, seed=cfg.seed, tests=tuple(keep)
        )
        tests = run_tests(ec, beh.raw)
        out.append(NHTest(ec, tests, verdict_markdown(ec, tests, model)))
    return out


def patch_stage(
    loaded: LoadedModel, task: Task, cfg: ReportConfig, progress: bool, runs: Runs | None = None
) -> PatchStage:
    """Exact sweeps and attribution patching on the first ``n_patch`` contexts of the inside draws (the contexts
    ``mechicl patch`` samples with the same seed). With ``runs`` that kept them in full, their cached runs are
    read from there instead of being run again."""
    shared = runs is not None and runs[0].full_rows >= cfg.n_patch
    if shared:
        rows = slice(0, cfg.n_patch)
        pair = pair_from_batches(
            runs[0].batch.select(rows), runs[1].batch.select(rows), "correct labels vs all labels flipped"
        )
    else:
        pair = pair_for(loaded, task, cfg.n_patch, cfg.n_examples, seed=cfg.seed)
    patcher = Patcher(loaded.model, pair, progress=progress)
    if shared:
        patcher.prime("clean", runs[0])
        patcher.prime("corrupted", runs[1])
    c, n = pair.clean, min(cfg.resid_examples, cfg.n_examples)
    lo = 0 if n == 0 else int(c.input_spans[:, -n, 0].min())
    hi = int(c.tokens.shape[1]) if n == 0 else int(c.readout_pos[:, -1].max()) + 1
    cells = [(l, p) for l in range(loaded.model.cfg.n_layers) for p in range(lo, hi)]
    results = tuple(patcher.sweep(k, "denoise", cells if k == "resid" else None) for k in cfg.patch_kinds)
    est = attribution_patch(loaded.model, pair, ("head_out",), "denoise")["head_out"]
    exact = results[cfg.patch_kinds.index("head_out")]
    table = exact.table()[["layer", "head", "value"]].rename(columns={"value": "exact"})
    table["attribution"] = est.values.reshape(-1).numpy()
    table["name"] = [head_name(l, h) for l, h in zip(table.layer, table["head"])]
    return PatchStage(
        results, (lo, hi), table, agreement(est.values, exact.values, k=min(10, len(table))), pair.description, pair
    )


def compute_report(
    loaded: LoadedModel, task: Task, cfg: ReportConfig, stages: Stages, progress: bool = True
) -> ReportData:
    """Run every stage. Long because it lists the stages in order, each under its timer and forward counter."""
    ic = cfg.inside()
    bc = BehaviorConfig(
        cfg.model,
        cfg.task,
        ("default", "random", "flipped", f"arbitrary:{cfg.arbitrary}"),
        cfg.k_max,
        cfg.n_behavior,
        cfg.seed,
        cfg.batch_size,
    )
    with stages.stage("behaviour", f"{cfg.n_behavior} contexts x 4 conditions, k <= {cfg.k_max}"):
        beh = run_behavior(loaded, task, bc, progress)
        nh = nh_tests(beh, cfg, loaded.name)
    inside = f"{cfg.n_inside} contexts x {cfg.n_examples} examples, default and flipped"
    full_rows = min(cfg.n_patch, cfg.n_inside)
    with stages.stage("shared runs", inside + f"; every position of the first {full_rows} (patching caches)"):
        runs = shared_runs(loaded, task, ic, full_rows, patch_cache_names(loaded.model), progress)
    with stages.stage("attention + saliency", inside + " (read from the shared runs; saliency and induction run)"):
        att = compute_attention(loaded, task, ic, Clock(), progress, saliency=True, runs=runs)
    with stages.stage("logit lens", inside + " (read from the shared runs)"):
        lens = compute_lens(loaded, task, ic, progress, runs=runs)
    with stages.stage("DLA + prior vs context", inside + " (read from the shared runs), + zero-shot queries"):
        dla, pvc, _ = compute_dla(loaded, task, ic, Clock(), progress, runs=runs)
    with stages.stage("patching", f"{cfg.n_patch} contexts x {cfg.n_examples} examples (correct vs flipped)"):
        patch = patch_stage(loaded, task, cfg, progress, runs)
    fc = cfg.heads()
    with stages.stage(
        "head finder", f"{cfg.n_screen} screen + {cfg.n_confirm} confirm + {cfg.n_eval} validate contexts"
    ):
        heads = find_heads_for(loaded, task, fc, progress)
    prior = circuit = None
    named = headline_heads(heads)
    if named:
        used = used_rows(task, fc.sizes, fc.k + 1, (cfg.seed,))  # the finder's rows: what follows is held out
        with stages.stage("prior vs context", f"{cfg.n_prior} contexts x {cfg.n_examples} examples + prior-head draws"):
            prior = prior_stage(loaded, task, cfg, named, used)
        with stages.stage("circuit", f"{cfg.n_circuit} fresh contexts, paths among {', '.join(named)}"):
            circuit = circuit_stage(loaded, task, cfg, named, used)
    groups = None
    if cfg.attribution:
        layers = attattr_layers(named, att.heads, cfg.top)
        with stages.stage(
            "AttAttr", f"the patching pair, both renderings, m = {cfg.attribution_steps}, layers {layers}"
        ):
            # 4 rows a chunk: the backward keeps every later layer's activations of the chunk (with 32-row chunks the
            # whole run peaked at 5.07 GB on gemma3-270m: docs/results/report/cost.txt); the forwards are the same
            ac = AttributeConfig(cfg.model, cfg.task, steps=cfg.attribution_steps, seed=cfg.seed, max_rows=4)
            groups = attattr_groups(patch.pair, attattr_both(loaded, patch.pair, ac, layers))
    return ReportData(cfg, beh, nh, att, lens, dla, pvc, patch, heads, task.n_classes, groups, runs, prior, circuit)


def attattr_layers(named: list[str], attention: pd.DataFrame, top: int) -> list[int]:
    """The layers AttAttr runs on in the report: the headline heads' (each layer costs about 2 (m + 2) forward +
    backward pairs per rendering, so all layers would dominate the page's cost), else the top label-attention
    heads'."""
    if named:
        return sorted({parse_head(h)[0] for h in named})
    return sorted({int(l) for l in attention.nlargest(top, "label_attention").layer})


def prior_stage(loaded: LoadedModel, task: Task, cfg: ReportConfig, names: list[str], used: set[int]) -> PriorTables:
    """`mechicl prior` on the headline heads (``report_data.headline_heads``), each alone, with the prior-head
    finder, at every slot k >= 1 of ``n_prior`` contexts (``runs.prior.compute_prior``) drawn from task rows outside
    ``used`` (the finder's)."""
    ic = InsideConfig(cfg.model, cfg.task, cfg.n_prior, cfg.n_examples, 1, cfg.seed, cfg.batch_size, cfg.top)
    return compute_prior(loaded, task, ic, [[parse_head(h)] for h in names], find=True, exclude=used)


def write_tables(folder: RunFolder, d: ReportData) -> None:
    """The CSVs behind every number in the report."""
    folder.csv("behavior_summary.csv", d.behavior.summary)
    bayes = bayes_reference(d.behavior)
    if bayes is not None:
        folder.csv("bayes.csv", bayes)
    if d.nh:
        folder.csv("nh_tests.csv", pd.concat([n.tests.assign(hypothesis=n.config.hypothesis) for n in d.nh]))
    folder.csv("attention_heads.csv", d.attention.heads)
    if d.attention.saliency is not None:
        folder.csv("saliency_layers.csv", d.attention.saliency.layers)
    folder.csv("lens_summary.csv", d.lens.summary)
    folder.csv("lens_gap.csv", d.lens.gap)
    folder.csv("dla.csv", d.dla)
    folder.csv("prior_vs_context.csv", d.prior_vs_context)
    if d.prior is not None:
        for name in ("routes", "dose", "prior_select", "prior_heads"):
            if len(getattr(d.prior, name)):
                folder.csv(f"prior_{name}.csv", getattr(d.prior, name))
        folder.csv("prior_moderation.csv", d.prior.moderation)
    if d.circuit is not None:
        folder.csv("circuit_paths.csv", d.circuit.paths)
    folder.csv("attribution_vs_exact.csv", d.patch.attribution)
    if d.attattr is not None:
        folder.csv("attattr_groups.csv", d.attattr)
    for name in TABLES:  # the head finder's cell, as `mechicl heads` writes it (none without an in-context effect)
        if len(getattr(d.heads, name)):
            folder.csv(f"{name}.csv", getattr(d.heads, name))


def rerun_command(args: argparse.Namespace, size: str) -> str:
    """The `mechicl report` command line that re-runs a report with these parsed flags (shown in its run facts)."""
    return (
        f"mechicl report --model {args.model} --task {args.task} --seed {args.seed}"
        + (f" --arbitrary {args.arbitrary}" if args.arbitrary else "")
        + {"quick": " --quick", "full": " --full", "default": ""}[size]
        + ("" if args.attribution else " --no-attribution")
        + (f" --label-names {','.join(args.label_names)}" if args.label_names else "")
        + (f" --template {args.template!r}" if args.template else "")
        + (" --no-balance" if args.no_balance else "")
        + (f" --findings {args.findings}" if args.findings else "")
        + (f" --circuit {args.circuit}" if args.circuit else "")
        + (f" --batch-size {args.batch_size}" if args.batch_size != 8 else "")
    )


def run_report(
    loaded: LoadedModel, task: Task, cfg: ReportConfig, out: Path, command: str, progress: bool = True
) -> RunFolder:
    """Compute every stage, write the CSVs, figures and report.html into ``out``; returns the folder."""
    if cfg.model != loaded.name and Path(cfg.model).name != loaded.name:
        cfg = dataclasses.replace(cfg, model=loaded.name)
    if cfg.arbitrary is None:
        cfg = dataclasses.replace(cfg, arbitrary=arbitrary_words(task.n_classes))
    check_external(cfg.findings, cfg.circuit, loaded.name)
    cfg = cfg.fit_heads(int(loaded.model.cfg.n_layers) * int(loaded.model.cfg.n_heads))
    folder = RunFolder(out)
    stages = Stages(loaded.model, progress)
    data = compute_report(loaded, task, cfg, stages, progress)
    write_tables(folder, data)
    title = f"{loaded.name} on {task.name}"
    with stages.stage("figures + views", "context 0 for the attention view"), plt.rc_context(FIGURE_DPI):
        rep = committed_replication(Path(cfg.findings)) if cfg.findings else committed_replication()
        headline = headline_section(data, rep)
        tables = [b for b in headline.blocks if isinstance(b, Table)]
        if tables:  # none without an in-context effect: the headline then says why no head is named
            folder.csv("headline.csv", tables[0].df)
        body = S.build_sections(folder, loaded, data, title, rep)
        sections = [with_competition(headline, body), *with_agreement(body, data)]
    facts = S.facts_section(loaded, cfg, stages.table(), command)
    folder.csv("facts.csv", facts.blocks[0].df)
    sections = with_guides([*sections, facts])
    folder.csv("stages.csv", stages.table())
    folder.json("config.json", cfg)
    render_report(f"mechicl report: {title}", S.intro(loaded, task, cfg), sections, folder / "report.html")
    return folder


def command(args: argparse.Namespace) -> int:
    """`mechicl report`: every analysis on one model and task as one self-contained report.html."""
    size = "quick" if args.quick else "full" if args.full else "default"
    extra = {} if args.attribution else {"attribution": False}
    cfg = ReportConfig.sized(
        size,
        model=args.model,
        task=args.task,
        seed=args.seed,
        arbitrary=args.arbitrary,
        batch_size=args.batch_size,
        findings=args.findings,
        circuit=args.circuit,
        **extra,
    )
    command = rerun_command(args, size)

    def run(loaded: Any, task: Any, out: Path) -> str:
        run_report(loaded, task, cfg, out, command)
        return "[mechicl] report: report.html in the run folder below"

    return in_folder(args, "report", run)
