"""The flags of `mechicl findings`: which cells (models, tasks, seeds, a TOML), the finder's stages and
pre-registration, and where the cells run (workers, Dask, Slurm). Imports nothing heavy."""

from __future__ import annotations

import argparse
from pathlib import Path

from mechicl.analysis.heads.modes import ABLATION_MODES, FINDINGS_DEFAULT
from mechicl.runs.args import add_k, int_at_least, int_list, key_values


def name_list(text: str) -> tuple[str, ...]:
    """``--models`` / ``--tasks``: one or more comma-separated names."""
    names = tuple(x.strip() for x in text.split(",") if x.strip())
    if not names:
        raise argparse.ArgumentTypeError(f"must be one or more comma-separated names; got {text!r}")
    return names


def findings_args(p: argparse.ArgumentParser) -> None:
    """``findings``: the head finder over models x tasks x seeds (a grid; every flag overrides the config's value)."""
    _grid_args(p)
    _finder_args(p)
    _executor_args(p)


def _grid_args(p: argparse.ArgumentParser) -> None:
    """``findings``: the grid (config, models, tasks, seeds) and the readout slots measured."""
    p.add_argument(
        "--config",
        type=Path,
        default=None,
        help="grid TOML (models, tasks, seeds, [config]); e.g. experiments/findings.toml",
    )
    p.add_argument(
        "--models",
        type=name_list,
        default=None,
        help="comma list of models (default: the config's, else gemma3-270m,smollm2-135m)",
    )
    p.add_argument(
        "--tasks",
        type=name_list,
        default=None,
        help="comma list of tasks (default: the config's, else the vader tasks and vega-cars)",
    )
    p.add_argument(
        "--seeds",
        type=int_list(0, "0,1,2"),
        default=None,
        help="comma list of seeds (default: the config's, else 0,1,2)",
    )
    add_k(p, None, note="; readout slots k_min..k are measured")
    p.add_argument("--k-min", type=int_at_least(0), default=None, help="first readout slot measured (default 8)")


def _finder_args(p: argparse.ArgumentParser) -> None:
    """``findings``: the finder's stages (draw sizes, candidates, ablation, controls, screen)."""
    for flag, default, what in [
        ("n-screen", 8, "screening"),
        ("n-confirm", 24, "confirmation"),
        ("n-validate", 32, "validation"),
    ]:
        p.add_argument(
            f"--{flag}", type=int_at_least(4), default=None, help=f"contexts of the {what} draw (default {default})"
        )
    p.add_argument(
        "--n-candidates", type=int_at_least(1), default=None, help="screened heads confirmed exactly (default 8)"
    )
    p.add_argument(
        "--n-top", type=int_at_least(1), default=None, help="confirmed heads validated against controls (default 3)"
    )
    p.add_argument(
        "--ablation", choices=ABLATION_MODES, default=None, help=f"slot ablation (default {FINDINGS_DEFAULT})"
    )
    p.add_argument(
        "--n-resample",
        type=int_at_least(1),
        default=None,
        help="donor draws averaged per resample ablation (default 2)",
    )
    p.add_argument("--control", choices=["layer", "norm"], default=None, help="control matching (default layer)")
    p.add_argument(
        "--n-control", type=int_at_least(1), default=None, help="matched control heads per validated head (default 5)"
    )
    p.add_argument("--screen", choices=["exact", "attribution"], default=None, help="screen ranking (default exact)")
    p.add_argument(
        "--heads",
        default=None,
        help="pre-registered heads, e.g. L10H3,L11H2: validated as given in every cell, no screening or confirmation",
    )
    p.add_argument(
        "--fresh-after",
        default=None,
        help="seeds, e.g. 0,1,2: no context uses a task row that those seeds' grid cells drew (rows never used before)",
    )


def _executor_args(p: argparse.ArgumentParser) -> None:
    """``findings``: where the cells run (workers, Dask, Slurm) and where the grid folder is."""
    p.add_argument(
        "--workers",
        type=int_at_least(1),
        default=1,
        help="local worker processes, one torch thread each (default 1: serial)",
    )
    p.add_argument(
        "--scheduler",
        default=None,
        help="a Dask distributed scheduler address, tcp://host:port (pip install 'mechicl[distributed]')",
    )
    p.add_argument(
        "--slurm",
        type=key_values,
        default=None,
        help="submitit/Slurm parameters as key=value,... e.g. slurm_partition=gpu,timeout_min=60",
    )
    p.add_argument(
        "--summarise-only", action="store_true", help="run no cell; rebuild out/summary from the finished cells"
    )
    p.add_argument(
        "--rerun-damaged",
        action="store_true",
        help="re-run finished cells whose files no longer match their manifest.json (default: stop and name them)",
    )
    p.add_argument("--threads", type=int_at_least(1), default=1, help="torch threads in the serial run (default 1)")
    p.add_argument(
        "--out",
        type=Path,
        default=Path("runs/findings"),
        help="grid folder; finished cells in it are skipped (default runs/findings)",
    )
