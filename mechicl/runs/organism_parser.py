"""`mechicl organism train`'s flags: the recipe, with the shipped recipe's values as defaults shown in --help."""

from __future__ import annotations

import argparse
from pathlib import Path

from mechicl.runs.args import int_at_least

ORGANISM_DEFAULTS = {"p_arbitrary": 0.3, "label_noise": 0.1, "steps": 3500, "keep_heads": 1, "prune_steps": 1000}
"""The shipped recipe (``data.organism.LanguageConfig.from_prior_strength``, ``models.organism.OrganismConfig``);
``tests/runs/test_cli_flags.py`` checks that they agree."""


class DefaultsFormatter(argparse.HelpFormatter):
    """Help that ends every option's text with its default, unless the text already gives one or there is none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.option_strings and "default" not in text and action.default not in (None, False, argparse.SUPPRESS):
            text += " (default: %(default)s)"
        return text


def organism_train_args(p: argparse.ArgumentParser) -> None:
    """``organism train``: the recipe's flags, with the shipped recipe's values as defaults (shown in --help)."""
    d = ORGANISM_DEFAULTS
    p.add_argument(
        "--prior-strength",
        type=float,
        required=True,
        default=argparse.SUPPRESS,
        help="P(default label map | sentiment labels), in [0, 1]; shipped: 0.97 strong, 0.6 weak",
    )
    p.add_argument(
        "--p-arbitrary", type=float, default=d["p_arbitrary"], help="share of sequences with arbitrary letter labels"
    )
    p.add_argument(
        "--label-noise", type=float, default=d["label_noise"], help="chance that a shown label is the other class's"
    )
    p.add_argument("--steps", type=int_at_least(1), default=d["steps"], help="optimizer steps of the first stage")
    p.add_argument(
        "--keep-heads",
        type=int_at_least(0),
        default=d["keep_heads"],
        help="pruning stage: last-layer heads kept (0 = no pruning stage)",
    )
    p.add_argument("--prune-steps", type=int_at_least(0), default=d["prune_steps"], help="steps after pruning")
    p.add_argument("--seed", type=int_at_least(0), default=0, help="training seed")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="checkpoint path (.safetensors; default runs/organism-s<strength>-seed<seed>.safetensors); "
        "a model card .md is written beside it",
    )
