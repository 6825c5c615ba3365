"""Pictures: layer x head heatmaps, per-layer line plots, and offline circuitsvis attention views.

circuitsvis's ``str(obj)`` imports its JavaScript from a CDN (blank offline); every view here is
saved from ``obj.local_src``, which inlines the bundled script, so the HTML files work offline.
Token names mark the prompt's structure (positions from the PromptBatch):
``[L]`` label token (``[L✗]`` when it shows a class other than the example's true one),
``[Q]`` readout slot, ``«`` / ``»`` first / last token of an input span, ``⏎`` newline.
"""

from __future__ import annotations

import html
import json
import textwrap
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from jaxtyping import Float  # noqa: E402
from torch import Tensor  # noqa: E402

from mechicl.prompts import PromptBatch, PromptError, build_prompt_batch, sample_contexts  # noqa: E402

LEGEND = ("[L] label token ([L✗]: shows a class other than the example's true class) · "
          "[Q] readout slot (predicts the next label) · « » first / last token of an input · ⏎ newline")


def head_heatmap(df: pd.DataFrame, value: str, path: Path, title: str = "", label: str | None = None) -> Path:
    """Layer x head heatmap of ``df[value]`` (columns layer, head). Diverging colours when values change sign."""
    grid = df.pivot_table(index="layer", columns="head", values=value, aggfunc="mean").sort_index()
    v = grid.to_numpy()
    signed = np.nanmin(v) < 0 < np.nanmax(v)
    lim = np.nanmax(np.abs(v)) or 1.0
    n_layers, n_heads = v.shape
    fig, ax = plt.subplots(figsize=(1.2 + 0.55 * n_heads + 1.2, 1.0 + 0.28 * n_layers), dpi=120)
    im = ax.imshow(v, aspect="auto", cmap="RdBu_r" if signed else "viridis",
                   vmin=-lim if signed else None, vmax=lim if signed else None)
    ax.set_xticks(range(n_heads), [str(h) for h in grid.columns])
    ax.set_yticks(range(n_layers), [str(l) for l in grid.index])
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    if n_heads * n_layers <= 120:
        for (i, j), x in np.ndenumerate(v):
            ax.text(j, i, f"{x:.2f}", ha="center", va="center", fontsize=6,
                    color="black" if signed or x > np.nanmean(v) else "white")
    fig.colorbar(im, ax=ax, label=label or value, shrink=0.8)
    ax.set_title("\n".join(textwrap.wrap(title, 48)), fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def line_plot(df: pd.DataFrame, x: str, y: str, path: Path, hue: str | None = None, title: str = "",
              ylabel: str | None = None, band: tuple[str, str] | None = None, xlabel: str | None = None,
              vline: float | None = None) -> Path:
    """One line per ``hue`` value of ``y`` against ``x`` (optional CI band columns, optional marker line)."""
    fig, ax = plt.subplots(figsize=(5.6, 3.6), dpi=120)
    groups = df.groupby(hue, sort=False) if hue else [("", df)]
    for name, d in groups:
        d = d.sort_values(x)
        (ln,) = ax.plot(d[x], d[y], marker="o", ms=3, label=str(name) if hue else None)
        if band:
            ax.fill_between(d[x], d[band[0]], d[band[1]], color=ln.get_color(), alpha=0.2, lw=0)
    if vline is not None:
        ax.axvline(vline, color="grey", ls="--", lw=1)
    ax.set_xlabel(xlabel or x)
    ax.set_ylabel(ylabel or y)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    if hue:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def token_names(batch: PromptBatch, row: int, tokenizer: Any) -> list[str]:
    """Readable token strings of context ``row`` (unpadded) with the markers of the module docstring."""
    n = int(batch.lengths[row])
    ids = batch.tokens[row, :n].tolist()
    names = [tokenizer.decode([t]).replace("\n", "⏎") for t in ids]
    if int(batch.roles[row, 0]) == 1:  # BOS
        names[0] = "<bos>"
    for (s, e) in batch.input_spans[row].tolist():
        names[s] = "«" + names[s]
        names[e - 1] = names[e - 1] + "»"
    for j, p in enumerate(batch.label_pos[row].tolist()):
        wrong = int(batch.shown_labels[row, j]) != int(batch.true_labels[row, j])
        names[p] = ("[L✗]" if wrong else "[L]") + names[p]
    for p in batch.readout_pos[row].tolist():
        names[p] = "[Q]" + names[p]
    return names


def save_html(views: Sequence[Any], path: Path, title: str, notes: Sequence[str] = ()) -> Path:
    """Write circuitsvis views as one self-contained page (``local_src``: no external script)."""
    body = "".join(f"<p>{html.escape(n)}</p>\n" for n in notes)
    parts = "\n".join(v.local_src for v in views)
    path.write_text(
        f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title></head>\n"
        f"<body style=\"font-family: sans-serif\">\n<h2>{html.escape(title)}</h2>\n{body}{parts}\n</body></html>\n",
        encoding="utf-8",
    )
    return path


def attention_heads_html(batch: PromptBatch, row: int, tokenizer: Any,
                         patterns: Float[Tensor, "head query key"], head_names: Sequence[str], path: Path,
                         title: str, notes: Sequence[str] = ()) -> Path:
    """circuitsvis ``attention_heads`` view of selected heads on one context."""
    import circuitsvis as cv

    names = token_names(batch, row, tokenizer)
    n = len(names)
    view = cv.attention.attention_heads(attention=patterns[:, :n, :n].numpy(), tokens=names,
                                        attention_head_names=list(head_names))
    return save_html([view], path, title, [LEGEND, *notes])


def readout_attention_html(batch: PromptBatch, row: int, tokenizer: Any, values: Float[Tensor, "key series"],
                           series: Sequence[str], path: Path, title: str, notes: Sequence[str] = ()) -> Path:
    """circuitsvis ``colored_tokens_multi``: each token coloured by the attention it receives (one series
    per head, e.g. from the last readout slot)."""
    import circuitsvis as cv

    names = token_names(batch, row, tokenizer)
    view = cv.tokens.colored_tokens_multi(tokens=names, values=values[: len(names)].float(), labels=list(series))
    return save_html([view], path, title, [LEGEND, *notes])


# ------------------------------------------------------------- reports ---
# Each report runs one CLI command's analyses on default and flipped contexts built from the same
# example ids, writes CSV tables, PNGs (and HTML views) into ``out`` and returns its markdown summary.


@dataclass(frozen=True)
class InsideConfig:
    """One `mechicl attention | lens | dla` run.

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
            raise PromptError(f"need n_contexts >= 2 and 1 <= k_min < n_examples "
                              f"(got {self.n_contexts}, k_min={self.k_min}, n_examples={self.n_examples})")


def _batches(loaded: Any, task: Any, cfg: InsideConfig) -> tuple[PromptBatch, PromptBatch]:
    ids = sample_contexts(task, cfg.n_contexts, cfg.n_examples, seed=cfg.seed)
    kw = dict(n_ctx=loaded.n_ctx, prepend_bos=loaded.prepend_bos, seed=cfg.seed)
    return (build_prompt_batch(task, loaded.tokenizer, ids, "default", **kw),
            build_prompt_batch(task, loaded.tokenizer, ids, "flipped", **kw))


def md_table(df: pd.DataFrame, digits: int = 3) -> str:
    """A markdown table (floats rounded)."""
    cols = list(df.columns)
    fmt = lambda v: f"{v:.{digits}f}" if isinstance(v, (float, np.floating)) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def _header(kind: str, loaded: Any, cfg: InsideConfig, extra: str = "") -> list[str]:
    return [f"# {kind}: {loaded.name} on {cfg.task}", "",
            f"{cfg.n_contexts} contexts x {cfg.n_examples} examples (seed {cfg.seed}); default and flipped labels "
            f"on the same example ids; queries = readout slots with k >= {cfg.k_min} earlier examples. {extra}", ""]


class _Clock:
    """Wall and process-CPU seconds per stage (CPU time is what a busy shared machine does not inflate)."""

    def __init__(self) -> None:
        self.t0 = self.t = time.perf_counter()
        self.c0 = time.process_time()
        self.laps: list[tuple[str, float]] = []

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps.append((name, now - self.t))
        self.t = now

    def line(self) -> str:
        stages = ", ".join(f"{n} {s:.0f} s" for n, s in self.laps)
        return (f"Wall time {time.perf_counter() - self.t0:.0f} s, process CPU time {time.process_time() - self.c0:.0f} s "
                f"(model load excluded; stages: {stages}).")


def _finish(out: Path, cfg: InsideConfig, lines: list[str], clock: _Clock) -> str:
    lines += ["", clock.line()]
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    return text


def report_attention(loaded: Any, task: Any, cfg: InsideConfig, out: Path, progress: bool = True,
                     saliency: bool = True, html_heads: int = 6) -> str:
    """Label attention, PM, induction, saliency; tables, heatmaps, HTML views. Returns the markdown summary."""
    from mechicl import attention as A
    from mechicl.attribution import attention_saliency

    clock = _Clock()
    out.mkdir(parents=True, exist_ok=True)
    model = loaded.model
    bd, bf = _batches(loaded, task, cfg)
    pats = [A.readout_patterns(model, b, cfg.batch_size, progress) for b in (bd, bf)]
    la = A.label_attention(model, [bd, bf], task.n_classes, cfg.k_min, patterns=pats)
    clock.lap("label attention")
    ind = A.induction_scores(loaded, seed=cfg.seed)
    clock.lap("induction")
    la.mass.to_csv(out / "label_attention.csv", index=False)
    la.by_distance.to_csv(out / "label_attention_by_distance.csv", index=False)
    la.pm.to_csv(out / "pm.csv", index=False)
    ind.to_csv(out / "induction.csv", index=False)

    heads = la.label_mass("default").merge(la.label_mass("flipped"), on=["layer", "head"], suffixes=("", "_flipped"))
    pm_w = la.pm.pivot_table(index=["layer", "head"], columns="condition", values="pm").reset_index()
    heads = heads.merge(pm_w.rename(columns={"default": "pm", "flipped": "pm_flipped"}), on=["layer", "head"])
    heads = heads.merge(ind, on=["layer", "head"])
    sal = None
    if saliency:
        sal = attention_saliency(model, [bd, bf], "last", cfg.k_min, max(1, cfg.batch_size // 2), progress)
        clock.lap("saliency")
        sal.layers.to_csv(out / "saliency_layers.csv", index=False)
        sal.heads.to_csv(out / "saliency_heads.csv", index=False)
        heads = heads.merge(sal.heads[sal.heads.condition == "default"][["layer", "head", "saliency"]], on=["layer", "head"])
    heads.to_csv(out / "heads.csv", index=False)

    title = f"{loaded.name} / {cfg.task}"
    for cond in ("default", "flipped"):
        head_heatmap(la.label_mass(cond), "label_attention", out / f"label_attention_{cond}.png",
                     f"attention from readout slots to earlier labels ({cond}) - {title}")
        head_heatmap(la.pm[la.pm.condition == cond], "pm", out / f"pm_{cond}.png", f"PM score ({cond}) - {title}")
    head_heatmap(ind, "induction", out / "induction.png", f"induction score (repeated random tokens) - {title}")
    mass = la.mass.groupby(["condition", "category"], as_index=False)["mean"].mean()

    top = A.top_heads(heads, "label_attention", cfg.top)
    best = top.iloc[0]
    d = la.by_distance
    d = d[(d.layer == best.layer) & (d["head"] == best["head"])].copy()
    d["series"] = d.condition + np.where(d.same_word, ", word = query's class", ", other word")
    d = d.groupby(["series", "distance"], as_index=False)["mean"].mean()
    line_plot(d, "distance", "mean", out / "label_attention_distance.png", hue="series",
              title=f"{best['name']}: attention per earlier label token - {title}",
              ylabel="attention to one label token", xlabel="distance (examples back)")

    # HTML: the top heads on context 0, default and flipped; the last slot's attention over tokens
    sel = [(int(l), int(h)) for l, h in zip(top.layer.head(html_heads), top["head"].head(html_heads))]
    names = [f"L{l}H{h}" for l, h in sel]
    for cond, b in (("default", bd), ("flipped", bf)):
        p = A.context_patterns(model, b, 0, sel)
        attention_heads_html(b, 0, loaded.tokenizer, p, names, out / f"attention_heads_{cond}.html",
                             f"{loaded.name}: top label-attention heads, {cond} labels (context 0)",
                             [f"Heads ranked by mean attention from readout slots to earlier label tokens: {', '.join(names)}."])
        if cond == "default":
            last = int(b.readout_pos[0, -1])
            readout_attention_html(b, 0, loaded.tokenizer, p[:, last, :].T, names, out / "attention_to_labels.html",
                                   f"{loaded.name}: attention from the last readout slot (context 0, default labels)",
                                   ["Colour = attention from the final [Q] slot to each token, one series per head "
                                    "(pick it in the menu)."])
    if sal is not None:
        sl = sal.layers.melt(id_vars=["condition", "layer"], value_vars=["S_wp", "S_pq", "S_ww"], var_name="flow")
        sl["series"] = sl.flow + " (" + sl.condition + ")"
        line_plot(sl, "layer", "value", out / "saliency_layers.png", hue="series",
                  title=f"attention saliency per layer - {title}", ylabel="mean |sum_h A dL/dA| over pairs")
        head_heatmap(sal.heads[sal.heads.condition == "default"], "saliency", out / "saliency_heads_default.png",
                     f"saliency onto label tokens (default) - {title}")

    clock.lap("plots and HTML")
    lines = _header("Attention", loaded, cfg)
    lines += [f"## Top {cfg.top} heads by attention to earlier label tokens (default labels)", "",
              md_table(top[["name", "label_attention", "label_attention_flipped", "pm", "pm_flipped", "induction"]
                           + (["saliency"] if sal is not None else [])]), "",
              f"## Top {cfg.top} heads by PM score (correct labels)", "",
              md_table(A.top_heads(heads, "pm", cfg.top)[["name", "pm", "pm_flipped", "label_attention", "induction"]]), "",
              f"## Top {cfg.top} heads by induction score", "",
              md_table(A.top_heads(heads, "induction", cfg.top)[["name", "induction", "label_attention", "pm"]]), "",
              "## Mean attention mass per key category (all heads)", "",
              md_table(mass.pivot_table(index="category", columns="condition", values="mean").reset_index()), ""]
    if sal is not None:
        lines += ["## Attention saliency per layer (Wang et al.): S_wp text->labels, S_pq labels->query, S_ww rest", "",
                  md_table(sal.layers[sal.layers.condition == "default"][["layer", "S_wp", "S_pq", "S_ww", "share_wp", "share_pq"]], 5)]
    return _finish(out, cfg, lines, clock)


def report_lens(loaded: Any, task: Any, cfg: InsideConfig, out: Path, progress: bool = True, min_gap: float = 0.05) -> str:
    """Logit lens under default and flipped contexts and the critical layer. Returns the markdown summary."""
    from mechicl.attribution import logit_lens

    clock = _Clock()
    out.mkdir(parents=True, exist_ok=True)
    bd, bf = _batches(loaded, task, cfg)
    lens = logit_lens(loaded.model, [bd, bf], cfg.k_min, min_gap, cfg.batch_size, progress)
    clock.lap("lens")
    lens.raw.to_csv(out / "lens_raw.csv", index=False)
    lens.summary.to_csv(out / "lens_summary.csv", index=False)
    lens.gap.to_csv(out / "lens_gap.csv", index=False)
    title = f"{loaded.name} / {cfg.task}"
    for metric in ("accuracy", "log_likelihood"):
        s = lens.summary[lens.summary.metric.isin([f"{metric}_true", f"{metric}_shown"])].copy()
        s["series"] = s.condition + " vs " + s.metric.str.replace(f"{metric}_", "") + " label"
        s = s[~((s.condition == "default") & s.metric.str.endswith("_shown"))]  # = true for default
        line_plot(s, "depth", "mean", out / f"lens_{metric}.png", hue="series", band=("ci_low", "ci_high"),
                  title=f"logit lens ({metric}) - {title}", xlabel="blocks applied (0 = embeddings)",
                  ylabel=metric.replace("_", " "), vline=lens.critical_depth)
    piv = lens.summary.pivot_table(index="depth", columns=["metric", "condition"], values="mean")
    table = pd.DataFrame({
        "depth": piv.index,
        "acc_default": piv[("accuracy_true", "default")].to_numpy(),
        "acc_flipped_true": piv[("accuracy_true", "flipped")].to_numpy(),
        "acc_flipped_shown": piv[("accuracy_shown", "flipped")].to_numpy(),
    })
    g = lens.gap[lens.gap.metric == "accuracy_true"].set_index("depth")
    table["gap"] = g.loc[table.depth, "mean"].to_numpy()
    table["gap_ci_low"] = g.loc[table.depth, "ci_low"].to_numpy()
    table["gap_ci_high"] = g.loc[table.depth, "ci_high"].to_numpy()
    n_layers = loaded.model.cfg.n_layers
    crit = lens.critical_depth
    verdict = (f"Critical layer: depth {crit} (the residual after block {crit - 1}) is the first where flipped "
               f"contexts lower true-label accuracy by >= {min_gap} with a 95% CI above 0."
               if crit is not None else
               f"No critical layer: at no depth does the flipped-context true-label accuracy fall below the "
               f"default one by >= {min_gap} with a 95% CI above 0.")
    lines = _header("Logit lens", loaded, cfg, f"Depth d = residual after d blocks (0 = embeddings, {n_layers} = the "
                    "model's output); label-set accuracy against the true label.")
    lines += [verdict, "", f"## Top {cfg.top} depths by accuracy gap (default - flipped, true labels)", "",
              md_table(table.sort_values("gap", ascending=False).head(cfg.top)), "", "## All depths", "", md_table(table)]
    return _finish(out, cfg, lines, clock)


def report_dla(loaded: Any, task: Any, cfg: InsideConfig, out: Path, progress: bool = True) -> str:
    """DLA (shown-label and prior-label decompositions) and the prior-vs-context table."""
    from mechicl.attribution import dla_table, direct_logits, prior_vs_context, zero_shot_batch, zero_shot_prior

    clock = _Clock()
    out.mkdir(parents=True, exist_ok=True)
    model = loaded.model
    bd, bf = _batches(loaded, task, cfg)
    prior = zero_shot_prior(model, zero_shot_batch(task, loaded, bd), tuple(bd.example_ids.shape),
                            max(cfg.batch_size, 32), progress)
    clock.lap("zero-shot prior")
    dd, df = direct_logits(model, bd, cfg.batch_size, progress), direct_logits(model, bf, cfg.batch_size, progress)
    clock.lap("DLA")
    tab = pd.concat([dla_table(dd, bd, prior, cfg.k_min), dla_table(df, bf, prior, cfg.k_min)], ignore_index=True)
    pvc = prior_vs_context(dd, df, bd, bf, prior, cfg.k_min)
    tab.to_csv(out / "dla.csv", index=False)
    pvc.to_csv(out / "prior_vs_context.csv", index=False)
    title = f"{loaded.name} / {cfg.task}"
    hd = tab[tab.kind == "head"]
    for cond in ("default", "flipped"):
        for dec in ("shown", "prior"):
            head_heatmap(hd[(hd.condition == cond) & (hd.decomposition == dec)], "dla", out / f"dla_{dec}_{cond}.png",
                         f"DLA on ({dec} label - other), {cond} contexts - {title}", "logit difference")
    ph = pvc[pvc.kind == "head"]
    for col in ("context", "prior", "side"):
        head_heatmap(ph, col, out / f"prior_vs_context_{col}.png", f"{col} part of each head's direct effect - {title}")
    mlp = tab[tab.kind == "mlp"].assign(series=lambda x: x.decomposition + " label, " + x.condition)
    line_plot(mlp, "layer", "dla", out / "dla_mlp.png", hue="series", title=f"MLP direct effects - {title}",
              ylabel="logit difference")
    tot = tab[tab.kind == "total"].pivot_table(index="decomposition", columns="condition", values="dla").reset_index()
    n = (prior == bd.true_labels)[:, cfg.k_min:].double().mean().item()
    cols = ["name", "context", "prior", "side", "dla_shown_default", "dla_shown_flipped", "dla_prior_default"]
    named = pvc[pvc.kind == "head"].rename(columns={"component": "name"})
    lines = _header("Direct logit attribution", loaded, cfg,
                    "Logit difference = logit of the target label minus the mean of the other labels; the final "
                    "norm's scale is frozen from each run. The zero-shot prior is the model's k = 0 prediction "
                    f"for the same input (equal to the true label for {n:.1%} of queries).")
    hs = hd[(hd.condition == "default") & (hd.decomposition == "shown")]
    top = hs.reindex(hs.dla.abs().sort_values(ascending=False).index).head(cfg.top).rename(columns={"component": "name"})
    lines += ["## Model's mean logit difference", "", md_table(tot), "",
              f"## Top {cfg.top} heads by |DLA| on (shown label - other), default contexts", "",
              md_table(top[["name", "dla"]]), "",
              "## Prior vs context (heads; MLPs are in prior_vs_context.csv)",
              "context = how much of the component's direct effect flips with the label shown in context; "
              "prior = how much stays with the zero-shot label (see mechicl.attribution.prior_vs_context).", "",
              "Most on the context side (largest context - prior):", "",
              md_table(named.sort_values("side", ascending=False).head(5)[cols]), "",
              "Most on the prior side (smallest context - prior):", "",
              md_table(named.sort_values("side").head(5)[cols])]
    return _finish(out, cfg, lines, clock)
