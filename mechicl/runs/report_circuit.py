"""Section 7 of `mechicl report`, "Circuit and findings": read from run folders that `mechicl findings` and
`mechicl circuit` wrote (``--findings DIR``, ``--circuit DIR``). Those commands cost minutes to hours (a grid
of cells, path patching), so the report includes their results instead of re-running them; without the
flags the section names the commands that fill it. Every number shown is read from the folder's CSVs."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from mechicl.errors import ConfigError
from mechicl.runs.circuit import significant_edges
from mechicl.runs.folder import safe_name
from mechicl.viz.report_html import Figure, Note, Section, Table


def check_external(findings: str | None, circuit: str | None, model: str) -> None:
    """Fail before any forward when a folder given to ``--findings`` / ``--circuit`` cannot fill section 7."""
    if findings is not None:
        heads = Path(findings) / "summary" / "heads.csv"
        if not heads.is_file():
            raise ConfigError(
                f"--findings {findings}: no {heads}; give the --out folder of a finished "
                f"`mechicl findings` grid (its summary/ is rebuilt by `mechicl findings --summarise-only`)"
            )
    if circuit is not None:
        cfg = Path(circuit) / "config.json"
        if not (cfg.is_file() and (Path(circuit) / "paths.csv").is_file()):
            raise ConfigError(f"--circuit {circuit}: no config.json and paths.csv; give a `mechicl circuit` run folder")
        ran = json.loads(cfg.read_text()).get("model")
        if ran != model:
            raise ConfigError(
                f"--circuit {circuit} was run on {ran!r}, this report on {model!r}; run `mechicl circuit "
                f"--model {model}` and give its folder"
            )


def findings_blocks(folder: Path, model: str) -> list:
    """The grid's head verdicts for ``model`` and its layer x head effect map."""
    heads = pd.read_csv(folder / "summary" / "heads.csv")
    heads = heads[heads.model == model]
    cells = pd.read_csv(folder / "summary" / "cells.csv")
    cells = cells[cells.model == model]
    if not len(cells):
        return [
            Note(
                f"The findings grid in {folder} has no cell for {model}; run `mechicl findings --models {model} "
                f"--out {folder}` (it resumes).",
                pointer=True,
            )
        ]
    rep = heads.sort_values(["n_above_control", "effect_median"], ascending=False).head(8)
    table = rep[
        ["head", "verdict", "per_task", "effect_median", "effect_min", "effect_max", "control_mean_median"]
    ].copy()
    table.insert(2, "above control / cells", [f"{a}/{n}" for a, n in zip(rep.n_above_control, rep.n_cells)])
    n_eff = int(cells.has_effect.sum())
    repl = list(heads[heads.verdict == "replicates"]["head"])
    blocks: list = [
        Table(
            table.reset_index(drop=True),
            f"Findings grid ({folder}): {len(cells)} cells of {model} over tasks "
            f"{', '.join(dict.fromkeys(cells.task))}, {n_eff} with an in-context effect to attribute. "
            + (
                f"Heads that replicate (above matched controls in >= 2/3 of cells): {', '.join(repl)}."
                if repl
                else "No head replicates across cells."
            )
            + " Effects are shares of the correct-vs-flipped gap in P(true label) removed by ablation, "
            "validated on held-out contexts (docs/findings.md).",
        )
    ]
    png = folder / "summary" / f"effects_{safe_name(model)}.png"
    if png.is_file():
        blocks.append(
            Figure(
                png,
                "Screening effect of each head alone, per task (mean over seeds); outlined heads are "
                "above matched controls in a cell. Look for the same heads lighting up in every panel.",
            )
        )
    return blocks


def circuit_blocks(folder: Path) -> list:
    """The circuit figure(s) and the path effects whose CI excludes 0, above the run's own edge threshold."""
    threshold = float(json.loads((folder / "config.json").read_text()).get("threshold", 0.05))
    paths = pd.read_csv(folder / "paths.csv")
    sig = significant_edges(paths, threshold)  # the circuit figure's own edge rule
    n = int(paths.n_contexts.max()) if len(paths) else 0
    top = sig.reindex(sig.effect.abs().sort_values(ascending=False).index).head(10)
    blocks: list = [
        Table(
            top[["sender", "receiver", "input", "positions", "mlps", "effect", "ci_low", "ci_high"]]
            .rename(columns={"effect": "path_effect"})
            .reset_index(drop=True),
            f"Path patching ({folder}): of {len(paths)} sender -> receiver paths, {len(sig)} have "
            f"|effect| >= {threshold} with a 95% interval over {n} held-out contexts excluding 0"
            + (
                f"; the largest is {top.iloc[0].sender} -> {top.iloc[0].receiver} ({top.iloc[0].input}) "
                f"{top.iloc[0].effect:+.2f} [{top.iloc[0].ci_low:+.2f}, {top.iloc[0].ci_high:+.2f}]."
                if len(top)
                else ". The evidence does not support a circuit at this size."
            ),
        )
    ]
    for png in sorted(folder.glob("circuit_*.png")):
        blocks.append(
            Figure(
                png,
                f"Circuit ({png.stem}): heads as nodes, path effects above the threshold with a CI "
                "excluding 0 as edges (docs/circuit.md).",
            )
        )
    return blocks


def circuit_section(findings: str | None, circuit: str | None, model: str, task: str) -> Section:
    """Section 7 from the given folders, or a note naming the commands that fill it."""
    blocks: list = []
    if findings is not None:
        blocks += findings_blocks(Path(findings), model)
    else:
        blocks.append(
            Note(
                f"Findings: run `mechicl findings --models {model} --out runs/findings` (the replication "
                "grid over tasks and seeds; minutes per cell), then re-run this report with "
                "`--findings runs/findings` to show its head verdicts here.",
                pointer=True,
            )
        )
    if circuit is not None:
        blocks += circuit_blocks(Path(circuit))
    else:
        blocks.append(
            Note(
                f"Circuit: run `mechicl circuit --model {model} --task {task} --out runs/circuit` "
                "(label-position and sender -> receiver path patching) and `mechicl aggregate` (evidence "
                "aggregation), then re-run this report with `--circuit runs/circuit` to show the circuit "
                "figure and path effects here.",
                pointer=True,
            )
        )
    return Section("Circuit and findings", tuple(blocks))
