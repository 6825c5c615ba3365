"""One CLI vocabulary: every subcommand's shared flags have the same dest, type, default and meaning
(walked from the argparse objects that `--help` prints), old spellings still work with a warning, and
help texts show defaults and descriptions."""

from __future__ import annotations

import argparse
import re

import pytest

from mechicl.cli import MULTI_TOKEN, build_parser
from mechicl.runs.args import BATCH_MEANING, CURVE_MEANING, K_MEANING

CURVE = {"demo", "behavior", "run"}  # --k is the largest k of a curve there
NO_K = {"report"}  # sizes come from --quick / --full presets
NO_BATCH = {
    "circuit",
    "heads",
}  # no batch knob: CircuitConfig runs every context at once; heads (a findings cell) re-runs one token per slot
SAME_EVERYWHERE = {  # flag -> (dest, default)
    "--label-names": ("label_names", None),
    "--template": ("template", None),
    "--multi-token": ("multi_token", False),
    "--no-balance": ("no_balance", False),
    "--seed": ("seed", 0),
    "--threads": ("threads", None),
    "--out": ("out", None),
    "--overwrite": ("overwrite", False),
}


def _subparsers(parser: argparse.ArgumentParser, prefix: str = "") -> dict[str, argparse.ArgumentParser]:
    """Every (nested) subcommand's parser, by name ("organism train" for nested ones)."""
    out = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out[f"{prefix}{name}"] = sub
                out.update(_subparsers(sub, f"{prefix}{name} "))
    return out


COMMANDS = _subparsers(build_parser())
TASK_COMMANDS = sorted(n for n, p in COMMANDS.items() if "--task" in p._option_string_actions)


def _flag(p: argparse.ArgumentParser, flag: str) -> argparse.Action | None:
    return p._option_string_actions.get(flag)


def _default_in_help(action: argparse.Action) -> str:
    m = re.search(r"\(default ([^)]*)\)$", action.help or "")
    assert m, f"{action.option_strings[0]} help does not end with its default: {action.help!r}"
    return m.group(1)


def test_the_walk_finds_the_commands():
    assert {
        "demo",
        "behavior",
        "run",
        "attention",
        "lens",
        "dla",
        "patch",
        "heads",
        "attribute",
        "circuit",
        "report",
        "organism train",
        "models",
        "tasks",
    } <= set(COMMANDS)
    assert set(TASK_COMMANDS) >= {"demo", "behavior", "run", "attention", "patch", "heads", "circuit", "report"}


@pytest.mark.parametrize("name", TASK_COMMANDS)
def test_task_commands_share_the_task_and_run_flags(name):
    p = COMMANDS[name]
    helps = {flag: _flag(COMMANDS["patch"], flag).help for flag in SAME_EVERYWHERE if flag != "--multi-token"}
    for flag, (dest, default) in SAME_EVERYWHERE.items():
        action = _flag(p, flag)
        if flag == "--multi-token":
            assert (action is not None) == (name in MULTI_TOKEN), (
                f"{name}: --multi-token only where labels are sequences"
            )
            if action is None:
                continue
            assert action.help == _flag(COMMANDS["behavior"], flag).help
        else:
            assert action is not None, f"`mechicl {name}` lacks {flag}"
            assert action.help == helps[flag], f"{name} {flag}: another meaning than in patch"
        assert action.dest == dest and (action.default == default or (name == "run" and flag == "--seed"))
    assert _flag(p, "--model").dest == "model" and _flag(p, "--task").dest == "task"


@pytest.mark.parametrize("name", TASK_COMMANDS)
def test_k_means_observed_examples_everywhere(name):
    k = _flag(COMMANDS[name], "--k")
    if name in NO_K:
        assert k is None
        return
    assert k is not None, f"`mechicl {name}` lacks --k"
    assert k.dest == "k" and k.type("3") == 3
    assert k.help.startswith(CURVE_MEANING if name in CURVE else K_MEANING), k.help
    shown = _default_in_help(k)
    assert shown == ("the config's" if k.default is None else str(k.default))
    old = _flag(COMMANDS[name], "--k-max" if name in CURVE else "--n-examples")
    assert old is not None and old.dest == "k" and old.help == argparse.SUPPRESS
    assert _flag(COMMANDS[name], "--n-examples" if name in CURVE else "--k-max") is None


@pytest.mark.parametrize("name", TASK_COMMANDS)
def test_batch_size_means_rows_per_forward_everywhere(name):
    b = _flag(COMMANDS[name], "--batch-size")
    if name in NO_BATCH:
        assert b is None
        return
    assert b is not None and b.dest == "batch_size" and b.type("5") == 5 and b.help.startswith(BATCH_MEANING)
    assert _default_in_help(b) == ("the config's" if b.default is None else str(b.default))
    old = _flag(COMMANDS[name], "--max-rows")
    assert old is not None and old.dest == "batch_size" and old.help == argparse.SUPPRESS


@pytest.mark.parametrize(
    "old, new, expect",
    [
        (["patch", "--n-examples", "8"], "--k 7", ("k", 7)),
        (["heads", "--n-examples", "17"], "--k 16", ("k", 16)),
        (["attention", "--n-examples", "16"], "--k 15", ("k", 15)),
        (["behavior", "--k-max", "12"], "--k 12", ("k", 12)),
        (["attribute", "--max-rows", "9"], "--batch-size 9", ("batch_size", 9)),
    ],
)
def test_old_flags_work_with_a_deprecation_message(old, new, expect, capsys):
    args = build_parser().parse_args(old)
    assert getattr(args, expect[0]) == expect[1]
    err = capsys.readouterr().err
    assert f"mechicl: warning: {old[1]} is deprecated" in err and f"use {new}" in err


def test_old_flags_keep_their_checks(capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["patch", "--n-examples", "1"])
    assert e.value.code == 2 and "--n-examples: must be an integer >= 2" in capsys.readouterr().err


def test_template_escapes_and_checks():
    args = build_parser().parse_args(["patch", "--template", "Q: {input}\\nA: {label}"])
    assert args.template == "Q: {input}\nA: {label}"


def test_every_command_has_a_description_and_organism_train_shows_defaults():
    for name, p in COMMANDS.items():
        assert p.description, f"`mechicl {name} --help` has no description"
    text = COMMANDS["organism train"].format_help()
    assert "(default: 3500)" in text and "(default: 0.3)" in text and "(default: 1000)" in text


def test_organism_train_defaults_are_the_shipped_recipe():
    from mechicl.data.organism import LanguageConfig
    from mechicl.models.organism import OrganismConfig
    from mechicl.runs.organism_parser import ORGANISM_DEFAULTS

    args = build_parser().parse_args(["organism", "train", "--prior-strength", "0.97"])
    lang, cfg = LanguageConfig.from_prior_strength(0.97), OrganismConfig()
    assert args.p_arbitrary == ORGANISM_DEFAULTS["p_arbitrary"] == lang.p_arbitrary
    assert args.label_noise == ORGANISM_DEFAULTS["label_noise"] == lang.label_noise
    assert (args.steps, args.keep_heads, args.prune_steps) == (cfg.steps, cfg.keep_heads, cfg.prune_steps)


def test_patch_kinds_are_the_registry():
    """`mechicl patch --kinds` lists the sweep kinds of ``analysis.patching.kinds`` (the one list) and rejects others
    before anything loads."""
    from mechicl.analysis.patching.kinds import KINDS
    from mechicl.cli import main

    kinds = _flag(COMMANDS["patch"], "--kinds")
    listed = re.search(r"comma list of (.*) \(default", kinds.help).group(1).split(", ")
    assert listed == list(KINDS) and len(KINDS) >= 8
    assert main(["patch", "--model", "tiny", "--task", "toy", "--kinds", "head_out,resid_post"]) == 2
