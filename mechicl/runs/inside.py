"""`mechicl lens | dla` and what `mechicl attention` shares with them: the config, the default/flipped
batches on the same draws, and the summary header and footer."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from jaxtyping import Int
from torch import Tensor

from mechicl.analysis.engine.hooks import FINAL
from mechicl.analysis.engine.readout import ReadoutRun, readout_run
from mechicl.analysis.inside.attention import pattern_names
from mechicl.analysis.inside.dla import direct_logits, dla_names, dla_table, prior_vs_context, zero_shot_prior
from mechicl.analysis.inside.lens import Lens, lens_names, logit_lens
from mechicl.data.batches import zero_shot_batch
from mechicl.data.prompts import PromptBatch, build_prompt_batch, sample_contexts
from mechicl.data.task import Task
from mechicl.errors import PromptError
from mechicl.models.base import LoadedModel
from mechicl.runs.folder import Clock, RunFolder, md_table
from mechicl.viz.plots import head_grid, heatmap, line_plot


@dataclass(frozen=True)
class InsideConfig:
    """One `mechicl attention | lens | dla` run. ``n_examples``: examples per context, the last included.

    Cost on Gemma-3-270M, 2 cores (16 examples ~ 150 tokens per context): about 1.4 s of forward per
    8 contexts and condition; saliency adds a backward (~3x a forward); DLA adds one 0-shot forward per query.
    """

    model: str
    task: str = "vader-words"
    n_contexts: int = 32
    n_examples: int = 16  # in-context examples per prompt; queries with k >= k_min are averaged
    k_min: int = 4
    seed: int = 0
    batch_size: int = 8
    top: int = 10

    def __post_init__(self) -> None:
        if self.n_contexts < 2 or not 1 <= self.k_min < self.n_examples:
            raise PromptError(
                f"need n_contexts >= 2 and 1 <= k_min < n_examples "
                f"(got {self.n_contexts}, k_min={self.k_min}, n_examples={self.n_examples})"
            )


def default_and_flipped(loaded: LoadedModel, task: Task, cfg: InsideConfig) -> tuple[PromptBatch, PromptBatch]:
    """The same context draws with correct and with flipped labels."""
    ids = sample_contexts(task, cfg.n_contexts, cfg.n_examples, seed=cfg.seed)
    kw = dict(n_ctx=loaded.n_ctx, prepend_bos=loaded.prepend_bos, seed=cfg.seed)
    return (
        build_prompt_batch(task, loaded.tokenizer, ids, "default", **kw),
        build_prompt_batch(task, loaded.tokenizer, ids, "flipped", **kw),
    )


Runs = tuple[ReadoutRun, ReadoutRun]  # one shared forward per condition: default, flipped


def shared_runs(
    loaded: LoadedModel,
    task: Task,
    cfg: InsideConfig,
    full_rows: int = 1,
    full_names: Sequence[str] = (),
    progress: bool = True,
) -> Runs:
    """One forward per context of each condition (``default_and_flipped``) keeping, at the readout slots, what
    attention, lens and DLA read, and at every position of the first ``full_rows`` contexts the attention
    patterns (the attention view of context 0) plus ``full_names`` (e.g. patching caches).

    Cost: ``2 x n_contexts`` forwards, chunks of ``max(batch_size, full_rows)`` contexts. Memory: the readout-slot
    activations of every layer (``n_contexts x n_examples x (pattern row + residual + head outputs)``) and the
    full activations of ``full_rows`` contexts."""
    model = loaded.model
    names = list(dict.fromkeys(pattern_names(model) + lens_names(model) + dla_names(model) + [FINAL]))
    full = list(dict.fromkeys(pattern_names(model) + list(full_names)))
    size = max(cfg.batch_size, full_rows)
    bd, bf = default_and_flipped(loaded, task, cfg)
    return (
        readout_run(model, bd, names, size, progress, full_names=full, full_rows=full_rows),
        readout_run(model, bf, names, size, progress, full_names=full, full_rows=full_rows),
    )


def batches_of(
    loaded: LoadedModel, task: Task, cfg: InsideConfig, runs: Runs | None
) -> tuple[PromptBatch, PromptBatch]:
    """The default and flipped batches: those of ``runs`` if given (so that the runs can be read), else fresh."""
    return (runs[0].batch, runs[1].batch) if runs is not None else default_and_flipped(loaded, task, cfg)


def header(kind: str, loaded: LoadedModel, cfg: InsideConfig, extra: str = "") -> list[str]:
    return [
        f"# {kind}: {loaded.name} on {cfg.task}",
        "",
        f"{cfg.n_contexts} contexts x {cfg.n_examples} examples (seed {cfg.seed}); default and flipped labels "
        f"on the same example ids; queries = readout slots with k >= {cfg.k_min} earlier examples. {extra}",
        "",
    ]


def finish(folder: RunFolder, cfg: InsideConfig, lines: list[str], clock: Clock) -> str:
    """Write summary.md (with the timing line) and config.json; return the summary."""
    text = "\n".join([*lines, "", clock.line()]) + "\n"
    folder.text("summary.md", text)
    folder.json("config.json", cfg)
    return text


def head_map(folder: RunFolder, df: pd.DataFrame, value: str, name: str, title: str, label: str | None = None) -> None:
    heatmap(head_grid(df, value), folder / name, title, label=label or value)


# ------------------------------------------------------------------ lens ---


def compute_lens(
    loaded: LoadedModel,
    task: Task,
    cfg: InsideConfig,
    progress: bool = True,
    min_gap: float = 0.05,
    runs: Runs | None = None,
) -> Lens:
    """The logit lens on the default and flipped batches of ``cfg`` (one forward per context and condition; none
    with ``runs`` from ``shared_runs``)."""
    bd, bf = batches_of(loaded, task, cfg, runs)
    return logit_lens(loaded.model, [bd, bf], cfg.k_min, min_gap, cfg.batch_size, progress, runs)


def plot_lens(folder: RunFolder, lens: Lens, title: str) -> None:
    """lens_accuracy.png and lens_log_likelihood.png: true/shown-label curves per depth, critical depth marked."""
    for metric in ("accuracy", "log_likelihood"):
        s = lens.summary[lens.summary.metric.isin([f"{metric}_true", f"{metric}_shown"])].copy()
        s["series"] = s.condition + " vs " + s.metric.str.replace(f"{metric}_", "") + " label"
        s = s[~((s.condition == "default") & s.metric.str.endswith("_shown"))]  # = true for default
        line_plot(
            s,
            "depth",
            "mean",
            folder / f"lens_{metric}.png",
            hue="series",
            band=("ci_low", "ci_high"),
            title=f"logit lens ({metric}) - {title}",
            xlabel="blocks applied (0 = embeddings)",
            ylabel=metric.replace("_", " "),
            vline=lens.critical_depth,
        )


def report_lens(
    loaded: LoadedModel, task: Task, cfg: InsideConfig, out: Path, progress: bool = True, min_gap: float = 0.05
) -> str:
    """Logit lens under default and flipped contexts and the critical layer. Returns the markdown summary."""
    clock, folder = Clock(), RunFolder(out)
    lens = compute_lens(loaded, task, cfg, progress, min_gap)
    clock.lap("lens")
    folder.csv("lens_raw.csv", lens.raw)
    folder.csv("lens_summary.csv", lens.summary)
    folder.csv("lens_gap.csv", lens.gap)
    plot_lens(folder, lens, f"{loaded.name} / {cfg.task}")
    piv = lens.summary.pivot_table(index="depth", columns=["metric", "condition"], values="mean")
    table = pd.DataFrame(
        {
            "depth": piv.index,
            "acc_default": piv[("accuracy_true", "default")].to_numpy(),
            "acc_flipped_true": piv[("accuracy_true", "flipped")].to_numpy(),
            "acc_flipped_shown": piv[("accuracy_shown", "flipped")].to_numpy(),
        }
    )
    g = lens.gap[lens.gap.metric == "accuracy_true"].set_index("depth")
    for col, src in (("gap", "mean"), ("gap_ci_low", "ci_low"), ("gap_ci_high", "ci_high")):
        table[col] = g.loc[table.depth, src].to_numpy()
    crit = lens.critical_depth
    verdict = (
        f"Critical layer: depth {crit} (the residual after block {crit - 1}) is the first where flipped "
        f"contexts lower true-label accuracy by >= {min_gap} with a 95% CI above 0."
        if crit is not None
        else f"No critical layer: at no depth does the flipped-context true-label accuracy fall below the "
        f"default one by >= {min_gap} with a 95% CI above 0."
    )
    lines = header(
        "Logit lens",
        loaded,
        cfg,
        f"Depth d = residual after d blocks (0 = embeddings, "
        f"{loaded.model.cfg.n_layers} = the model's output); label-set accuracy against the true label.",
    )
    lines += [
        verdict,
        "",
        f"## Top {cfg.top} depths by accuracy gap (default - flipped, true labels)",
        "",
        md_table(table.sort_values("gap", ascending=False).head(cfg.top)),
        "",
        "## All depths",
        "",
        md_table(table),
    ]
    return finish(folder, cfg, lines, clock)


# ------------------------------------------------------------------- DLA ---


def compute_dla(
    loaded: LoadedModel, task: Task, cfg: InsideConfig, clock: Clock, progress: bool = True, runs: Runs | None = None
) -> tuple[pd.DataFrame, pd.DataFrame, Int[Tensor, "batch example"]]:
    """The DLA table (both decompositions, both conditions), the prior-vs-context table and the zero-shot prior.

    Cost: one zero-shot forward per query, one forward per context and condition (none with ``runs``)."""
    model = loaded.model
    bd, bf = batches_of(loaded, task, cfg, runs)
    rd, rf = runs if runs is not None else (None, None)
    zs = zero_shot_batch(task, loaded.tokenizer, bd, n_ctx=loaded.n_ctx, prepend_bos=loaded.prepend_bos)
    prior = zero_shot_prior(model, zs, tuple(bd.example_ids.shape), max(cfg.batch_size, 32), progress)
    clock.lap("zero-shot prior")
    dd, df = (
        direct_logits(model, bd, cfg.batch_size, progress, rd),
        direct_logits(model, bf, cfg.batch_size, progress, rf),
    )
    clock.lap("DLA")
    tab = pd.concat([dla_table(dd, bd, prior, cfg.k_min), dla_table(df, bf, prior, cfg.k_min)], ignore_index=True)
    return tab, prior_vs_context(dd, df, bd, bf, prior, cfg.k_min), prior


def report_dla(loaded: LoadedModel, task: Task, cfg: InsideConfig, out: Path, progress: bool = True) -> str:
    """DLA (shown-label and prior-label decompositions) and the prior-vs-context table."""
    clock, folder = Clock(), RunFolder(out)
    tab, pvc, prior = compute_dla(loaded, task, cfg, clock, progress)
    bd = default_and_flipped(loaded, task, cfg)[0]
    folder.csv("dla.csv", tab)
    folder.csv("prior_vs_context.csv", pvc)
    _dla_plots(folder, tab, pvc, f"{loaded.name} / {cfg.task}")
    tot = tab[tab.kind == "total"].pivot_table(index="decomposition", columns="condition", values="dla").reset_index()
    n = (prior == bd.true_labels)[:, cfg.k_min :].double().mean().item()
    cols = ["name", "context", "prior", "side", "dla_shown_default", "dla_shown_flipped", "dla_prior_default"]
    named = pvc[pvc.kind == "head"].rename(columns={"component": "name"})
    lines = header(
        "Direct logit attribution",
        loaded,
        cfg,
        "Logit difference = logit of the target label minus the mean of the other labels; the final "
        "norm's scale is frozen from each run. The zero-shot prior is the model's k = 0 prediction "
        f"for the same input (equal to the true label for {n:.1%} of queries).",
    )
    hs = tab[(tab.kind == "head") & (tab.condition == "default") & (tab.decomposition == "shown")]
    top = (
        hs.reindex(hs.dla.abs().sort_values(ascending=False).index).head(cfg.top).rename(columns={"component": "name"})
    )
    lines += [
        "## Model's mean logit difference",
        "",
        md_table(tot),
        "",
        f"## Top {cfg.top} heads by |DLA| on (shown label - other), default contexts",
        "",
        md_table(top[["name", "dla"]]),
        "",
        "## Prior vs context (heads; MLPs are in prior_vs_context.csv)",
        "context = how much of the component's direct effect flips with the label shown in context; "
        "prior = how much stays with the zero-shot label (see mechicl.analysis.inside.dla.prior_vs_context).",
        "",
        "Most on the context side (largest context - prior):",
        "",
        md_table(named.sort_values("side", ascending=False).head(5)[cols]),
        "",
        "Most on the prior side (smallest context - prior):",
        "",
        md_table(named.sort_values("side").head(5)[cols]),
    ]
    return finish(folder, cfg, lines, clock)


def _dla_plots(folder: RunFolder, tab: pd.DataFrame, pvc: pd.DataFrame, title: str) -> None:
    hd = tab[tab.kind == "head"]
    for cond in ("default", "flipped"):
        for dec in ("shown", "prior"):
            head_map(
                folder,
                hd[(hd.condition == cond) & (hd.decomposition == dec)],
                "dla",
                f"dla_{dec}_{cond}.png",
                f"DLA on ({dec} label - other), {cond} contexts - {title}",
                "logit difference",
            )
    ph = pvc[pvc.kind == "head"]
    for col in ("context", "prior", "side"):
        head_map(folder, ph, col, f"prior_vs_context_{col}.png", f"{col} part of each head's direct effect - {title}")
    mlp = tab[tab.kind == "mlp"].assign(series=lambda x: x.decomposition + " label, " + x.condition)
    line_plot(
        mlp,
        "layer",
        "dla",
        folder / "dla_mlp.png",
        hue="series",
        title=f"MLP direct effects - {title}",
        ylabel="logit difference",
    )
