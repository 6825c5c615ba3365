"""The command entries of ``heads``, ``report``, ``findings`` and ``organism train``: flags -> config -> their
``runs`` module (the other commands' entries are ``runs.<command>.command``). Imported by ``cli.dispatch``
only when one of these commands runs: it loads torch."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from mechicl.data.organism import LanguageConfig
from mechicl.errors import ConfigError
from mechicl.models.organism import OrganismConfig
from mechicl.runs.command import in_folder
from mechicl.runs.findings import load_grid, make_executor, run_grid, summarise
from mechicl.runs.findings_report import findings_markdown
from mechicl.runs.heads import find_heads_for, preset_config, write_heads
from mechicl.runs.organism import train_and_save
from mechicl.runs.report import ReportConfig, rerun_command, run_report


def heads(args: argparse.Namespace) -> int:
    """`mechicl heads`: one cell of the held-out head finder (screen -> confirm -> validate against matched controls)."""
    cfg = preset_config(
        k=args.k,
        k_min=args.k // 2 if args.k_min is None else args.k_min,
        n_screen=args.n_screen,
        n_confirm=args.n_confirm,
        n_validate=args.n_eval,
        n_candidates=args.candidates,
        n_top=args.n_top,
        ablation=args.ablation,
        n_control=args.n_control,
        seed=args.seed,
    )

    def run(loaded: Any, task: Any, out: Path) -> str:
        result = find_heads_for(loaded, task, cfg)
        write_heads(result, out, loaded.name, task.name)
        return findings_markdown(result, loaded.name, task.name)

    return in_folder(args, "heads", run, config=cfg)


FINDINGS_KEYS = (  # the finder's flags that override the grid config's [config] values
    "k",
    "k_min",
    "n_screen",
    "n_confirm",
    "n_validate",
    "n_candidates",
    "n_top",
    "ablation",
    "n_resample",
    "control",
    "n_control",
    "screen",
)


def findings(args: argparse.Namespace) -> int:
    """`mechicl findings`: the head finder over a grid of models x tasks x seeds; resumable; replication summary."""
    over = {k: getattr(args, k) for k in FINDINGS_KEYS} | {
        "models": args.models,
        "tasks": args.tasks,
        "seeds": args.seeds,
    }
    spec = load_grid(args.config, **over)
    if args.summarise_only:
        summarise(args.out, spec)
    else:
        torch.set_num_threads(args.threads)
        slurm = dict(kv.split("=", 1) for kv in args.slurm.split(",")) if args.slurm else None
        executor, n = make_executor(args.workers, args.scheduler, slurm, args.out / "submitit")
        run_grid(spec, args.out, executor=executor, n_workers=n, rerun_damaged=args.rerun_damaged)
    print((args.out / "summary" / "summary.md").read_text(encoding="utf-8"))
    print(f"[mechicl] wrote {args.out}/summary (cells in {args.out}/cells)")
    return 0


def report(args: argparse.Namespace) -> int:
    """`mechicl report`: every analysis on one model and task as one self-contained report.html."""
    size = "quick" if args.quick else "full" if args.full else "default"
    extra = {"attribution": True} if args.attribution else {}
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


def organism_train(args: argparse.Namespace) -> int:
    """`mechicl organism train`: train an organism and write its checkpoint and model card."""
    try:
        lang = LanguageConfig.from_prior_strength(args.prior_strength, args.p_arbitrary, args.label_noise)
        cfg = OrganismConfig(
            language=lang, seed=args.seed, steps=args.steps, keep_heads=args.keep_heads, prune_steps=args.prune_steps
        )
    except ValueError as e:
        raise ConfigError(f"bad organism recipe: {e}") from e
    out = args.out or Path("runs") / f"organism-s{args.prior_strength:g}-seed{args.seed}.safetensors"
    card = train_and_save(cfg, out, name=out.stem)
    print(card.read_text())
    print(f"[mechicl] wrote {out} and {card}")
    return 0
