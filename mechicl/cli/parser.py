"""The ``mechicl`` argument parser: one entry per command (its one-line help, its long description and its flags
from ``runs.parsers``), in the order ``mechicl --help`` lists them."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from mechicl.runs import organism_parser
from mechicl.runs import parsers as P
from mechicl.runs.args import Parser

DESCRIPTIONS = {
    "demo": "The main job in one command: the default model on vader-words, accuracy, log-likelihood and entropy of "
    "the label against k (observed in-context examples) under default, random and flipped labels. The flags "
    "and outputs are those of `mechicl behavior` (docs/outputs.md).",
    "behavior": "Accuracy, log-likelihood and entropy of the label against k (0..K observed in-context examples) per "
    "label condition, with 95% intervals over context draws.",
    "run": "Run a hypothesis-test config (experiments/*.toml): behaviour scores, paired tests, a verdict. Flags "
    "given here override the config's values.",
    "attention": "Attention from readout slots to earlier label tokens, PM and induction scores, attention saliency; "
    "heatmaps and offline HTML views. Default vs flipped labels on the same contexts.",
    "lens": "Logit lens per depth under default vs flipped contexts, and the critical layer where they part.",
    "dla": "Direct logit attribution per head and MLP, and how much of each head's direct effect follows the "
    "context's labels vs the zero-shot prior.",
    "prior": "How in-context labels compete with the zero-shot prior: per bin of a query's zero-shot log-odds and "
    "per k, P(true) with correct and flipped labels, how often the prior wins, and the label information each "
    "given head set carries there (interchange), with CIs.",
    "patch": "Exact activation patching between correct- and flipped-label renderings of the same contexts: "
    "heatmaps and tables of the normalised logit difference.",
    "heads": "Find label-aggregation heads: one `mechicl findings` cell (screen, confirm, then validate on disjoint "
    "held-out draws against matched control heads); prints its summary and verdict.",
    "attribute": "Attention attribution that adds up: AttAttr and path integrated gradients beside exact and "
    "first-order patching.",
    "circuit": "Where label information is written and who reads it: label-position patching and sender -> receiver "
    "path patching on held-out contexts.",
    "aggregate": "Does a head's output scale with the evidence? Its direct effect on the flipped-vs-true label logits "
    "at the query against the count and placement of flipped demonstration labels, fitted as sum, vote, "
    "recency or per-position weights (held out), and a steering check with its mean flipped - default output.",
    "report": "Every analysis on one model and task as one offline report.html.",
    "findings": "The head finder over a grid of models x tasks x seeds: screen, confirm and validate on disjoint "
    "context draws, interchange ablation at every readout slot, layer/norm-matched controls, CIs over contexts; "
    "finished cells are skipped (resumable); a replication summary with a verdict per head.",
    "models": "List the model names mechicl knows.",
    "tasks": "List the task names mechicl knows.",
}

Flags = Callable[[argparse.ArgumentParser], None] | None
COMMANDS: list[tuple[str, str, Flags]] = [  # name, one-line help, flags (None: none); "organism" has subcommands
    ("demo", "the main job: default model, vader-words, default/random/flipped labels", P.behavior_args),
    ("behavior", "accuracy / log-likelihood / entropy against k per label condition", P.behavior_args),
    ("run", "run an experiment config (experiments/*.toml) and write its verdict", P.run_args),
    (
        "attention",
        "attention to label tokens, PM and induction scores, saliency; heatmaps and HTML views",
        P.attention_args,
    ),
    ("lens", "logit lens per layer under default vs flipped contexts; the critical layer", P.lens_args),
    ("dla", "direct logit attribution per head / MLP and the prior-vs-context table", P.inside_args),
    (
        "prior",
        "labels vs the zero-shot prior per query: behaviour and head label information by prior bin",
        P.prior_args,
    ),
    ("organism", "model organisms: small transformers with a known pre-training prior", None),
    ("patch", "exact activation patching, correct- vs flipped-label contexts; heatmaps and tables", P.patch_args),
    (
        "heads",
        "find label-aggregation heads: one findings cell (screen, confirm, validate vs matched controls)",
        P.heads_args,
    ),
    ("attribute", "attention attribution that adds up: AttAttr and path IG vs exact patching", P.attribute_args),
    ("report", "every analysis on one model and task as one offline report.html", P.report_args),
    (
        "circuit",
        "where label information is written and who reads it: label-position and path patching",
        P.circuit_args,
    ),
    (
        "aggregate",
        "evidence aggregation: head output vs the number and placement of flipped labels; steering",
        P.aggregate_args,
    ),
    (
        "findings",
        "head findings that hold up: held-out stages, matched controls, a grid over models x tasks x seeds",
        P.findings_args,
    ),
    ("models", "list model names", None),
    ("tasks", "list task names", None),
]


def _add_organism_parser(sub: argparse._SubParsersAction, help: str) -> None:
    org = sub.add_parser(
        "organism",
        help=help,
        description="Model organisms: small transformers with a known pre-training prior (docs/organism.md).",
    )
    org_sub = org.add_subparsers(dest="organism_command", required=True)
    train = org_sub.add_parser(
        "train",
        help="train an organism (deterministic; ~5 min on one CPU thread)",
        description="Train an organism (deterministic; ~5 min on one CPU thread) and write its "
        "checkpoint and model card.",
        formatter_class=organism_parser.DefaultsFormatter,
    )
    organism_parser.organism_train_args(train)


def build_parser() -> argparse.ArgumentParser:
    """Every command's flags; ``cli.dispatch`` maps the parsed ``command`` to the function that runs it."""
    parser = Parser(prog="mechicl", description="Mechanistic interpretability of in-context learning.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help, flags in COMMANDS:
        if name == "organism":
            _add_organism_parser(sub, help)
            continue
        p = sub.add_parser(name, help=help, description=DESCRIPTIONS.get(name, help))
        if flags is not None:
            flags(p)
    return parser
