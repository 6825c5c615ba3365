"""Command line: ``mechicl demo | behavior | run | attention | lens | dla | patch | heads | attribute | circuit | aggregate | report
| organism train | models | tasks``.

Each command parses its flags (shared ones, one vocabulary: ``runs.args``; each command's: ``runs.parsers``),
loads the task and model, and hands over to its module in ``mechicl.runs`` (the layers: cli -> runs ->
analysis -> data/models). Commands import their run module when they run, not at start-up, so that
``mechicl models`` or ``--help`` answers without loading torch and TransformerLens (about 3.5 s here);
no import cycle is avoided. Each function-level import is such a deferral, marked ``# deferred: imports
torch`` (checked: each module pulls in torch; the light ones are imported at the top).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mechicl.data.conditions import parse_conditions
from mechicl.data.names import parse_heads
from mechicl.data.task import check_tokenization
from mechicl.errors import ConfigError, LabelTokenError
from mechicl.models.registry import DEFAULT_MODEL, EMBEDDED, known_models
from mechicl.runs import parsers as P
from mechicl.runs.args import Parser, fraction, run_command

MULTI_TOKEN = {"demo", "behavior", "run"}  # commands that score labels as whole token sequences (--multi-token)


def _load(
    model: str, threads: int | None, task: Any = None, device: str = "cpu", dtype: str = "float32"
) -> tuple[Any, float]:
    """Set torch's thread count (if given), load ``model`` and report it; check that its tokenizer reads
    ``task`` (``check_tokenization``) before any compute. Returns it and the start time."""
    import torch  # deferred: imports torch

    from mechicl.models.loading import load_model  # deferred: imports torch

    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    loaded = load_model(model, device=device, dtype=dtype)
    print(
        f"[mechicl] loaded {loaded.name} ({loaded.source}; {loaded.device}, {loaded.dtype}) in "
        f"{time.perf_counter() - t0:.1f} s",
        flush=True,
    )
    if task is not None:
        check_tokenization(task, loaded.tokenizer)
    return loaded, t0


def _in_folder(
    args: argparse.Namespace,
    kind: str,
    run: Callable[[Any, Any, Path], str],
    config: Any = None,
    model: str | None = None,
    task_spec: str | None = None,
    **task_kw: Any,
) -> int:
    """A run command's shared path: check the model and --out, load the task (``preflight.task_from_args``),
    then load the model and call ``run(loaded, task, folder)`` inside the staged run folder, add what ran to its
    config.json (``preflight.record_ran``; written from ``config`` if the command wrote none); print its text."""
    from mechicl.runs.preflight import prepare, record_ran, staged_args, task_from_args  # deferred: imports torch

    model = model or args.model
    out = prepare(args, kind, model, task_spec or args.task)
    task = task_from_args(args, task_spec, **task_kw)
    try:
        with staged_args(args, out) as tmp:
            loaded, t0 = _load(
                model, args.threads, task, getattr(args, "device", "cpu"), getattr(args, "dtype", "float32")
            )
            text = run(loaded, task, tmp)
            record_ran(tmp, loaded, task, config)
    except LabelTokenError as e:
        if args.command in MULTI_TOKEN:
            raise
        head = str(e).split(" or allow multi-token labels")[0].rstrip(", ")
        raise LabelTokenError(
            f"{head}, or pass --template so that it stays whole. `mechicl {args.command}` reads one "
            f"token per label (--multi-token is for behavior, demo and run only)."
        ) from e
    print(text)
    _done(out, t0)
    return 0


def _done(out: Any, t0: float) -> None:
    """Report the run folder ``out`` (a path or a ``RunFolder``) and the wall time."""
    out = Path(getattr(out, "path", out))
    print(f"[mechicl] wrote {', '.join(sorted(p.name for p in out.iterdir()))} to {out}")
    print(f"[mechicl] total wall time {time.perf_counter() - t0:.0f} s")


def cmd_behavior(args: argparse.Namespace) -> int:
    """`mechicl behavior | demo`: accuracy, log-likelihood and entropy against k per label condition."""
    from mechicl.analysis.behavior.curves import BehaviorConfig  # deferred: imports torch
    from mechicl.runs.behavior import run_behavior, write_behavior  # deferred: imports torch

    conditions = tuple(c.name for c in parse_conditions(args.conditions))  # validate before loading
    if not conditions:
        raise ConfigError("--conditions is empty; give a comma list such as default,random,flipped")
    cfg = BehaviorConfig(
        args.model,
        args.task,
        conditions,
        args.k,
        args.n_contexts,
        args.seed,
        args.batch_size,
        args.multi_token,
        args.label_names,
    )

    def run(loaded: Any, task: Any, out: Path) -> str:
        print(f"[mechicl] task {task.name}: {task.description}", flush=True)
        return (write_behavior(run_behavior(loaded, task, cfg), out).path / "summary.md").read_text()

    return _in_folder(args, "behavior", run)


def cmd_run(args: argparse.Namespace) -> int:
    """`mechicl run <config.toml>`: an NH experiment; every flag given overrides the config's value."""
    from mechicl.runs.run import load_config, run_experiment, write_experiment  # deferred: imports torch

    cfg = load_config(
        args.config,
        model=args.model,
        task=args.task,
        n_contexts=args.n_contexts,
        seed=args.seed,
        label_names=list(args.label_names) if args.label_names else None,
        k_max=args.k,
        batch_size=args.batch_size,
        multi_token=True if args.multi_token else None,
    )

    def run(loaded: Any, task: Any, out: Path) -> str:
        print(
            f"[mechicl] {cfg.name}: {cfg.hypothesis} on {loaded.name} / {cfg.task}, {len(cfg.conditions)} conditions",
            flush=True,
        )
        result = run_experiment(cfg, loaded, task=task)
        write_experiment(result, out, Path(args.config).read_text(encoding="utf-8"))
        return result.verdict

    return _in_folder(
        args, cfg.name, run, config=cfg, model=cfg.model, task_spec=cfg.task, seed=cfg.seed, label_names=cfg.label_names
    )


def cmd_inside(args: argparse.Namespace) -> int:
    """`mechicl attention | lens | dla`: one look inside the model, on default vs flipped contexts."""
    from mechicl.runs.attention import report_attention  # deferred: imports torch
    from mechicl.runs.inside import InsideConfig, report_dla, report_lens  # deferred: imports torch

    if args.k_min > args.k:
        raise ConfigError(
            f"--k-min {args.k_min} is larger than --k {args.k}: no readout slot has that many earlier "
            f"examples; lower --k-min or raise --k"
        )
    cfg = InsideConfig(
        args.model, args.task, args.n_contexts, args.k + 1, args.k_min, args.seed, args.batch_size, args.top
    )
    if args.command == "attention":
        return _in_folder(
            args, "attention", lambda m, t, out: report_attention(m, t, cfg, out, saliency=not args.no_saliency)
        )
    if args.command == "lens":
        return _in_folder(args, "lens", lambda m, t, out: report_lens(m, t, cfg, out, min_gap=args.min_gap))
    return _in_folder(args, "dla", lambda m, t, out: report_dla(m, t, cfg, out))


def cmd_organism_train(args: argparse.Namespace) -> int:
    """`mechicl organism train`: train an organism and write its checkpoint and model card."""
    from mechicl.data.organism import LanguageConfig  # deferred: imports torch
    from mechicl.models.organism import OrganismConfig  # deferred: imports torch
    from mechicl.runs.organism import train_and_save  # deferred: imports torch

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


def cmd_patch(args: argparse.Namespace) -> int:
    """`mechicl patch`: exact activation-patching sweeps, correct- vs flipped-label contexts."""
    from mechicl.analysis.patching.exact import KINDS  # deferred: imports torch
    from mechicl.runs.patch import PatchRunConfig, run_patch  # deferred: imports torch

    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise ConfigError(f"unknown sweep kind(s) {bad}; --kinds takes a comma list of {', '.join(KINDS)}")
    directions = ("denoise", "noise") if args.direction == "both" else (args.direction,)
    cfg = PatchRunConfig(
        args.model,
        args.task,
        tuple(kinds),
        directions,
        args.n_contexts,
        args.k + 1,
        args.last_m,
        args.batch_size,
        args.top,
        args.seed,
    )
    return _in_folder(args, "patch", lambda m, t, out: run_patch(m, t, cfg, out)[1])


def cmd_attribute(args: argparse.Namespace) -> int:
    """`mechicl attribute`: AttAttr and path IG beside exact and first-order patching, correct- vs flipped-label contexts."""
    from mechicl.runs.attribute import AttributeConfig, run_attribute  # deferred: imports torch

    cfg = AttributeConfig(
        args.model,
        args.task,
        args.n_contexts,
        args.k + 1,
        args.steps,
        args.completeness_steps,
        args.metric,
        args.baseline,
        args.last_m,
        args.batch_size,
        args.top,
        args.view_heads,
        args.seed,
    )
    return _in_folder(args, "attribute", lambda m, t, out: run_attribute(m, t, cfg, out)[1])


def cmd_heads(args: argparse.Namespace) -> int:
    """`mechicl heads`: find label-aggregation heads and validate them by ablation against random head sets."""
    from mechicl.analysis.heads.old_finder import HeadFinderConfig  # deferred: imports torch
    from mechicl.runs.heads import find_heads_for, heads_markdown, write_heads  # deferred: imports torch
    from mechicl.runs.preflight import check_head_sets  # deferred: imports torch

    check_head_sets(args)
    cfg = HeadFinderConfig(
        args.model,
        args.task,
        args.k + 1,
        args.n_screen,
        args.n_eval,
        args.candidates,
        args.set_sizes,
        args.n_control,
        args.ablation,
        args.seed,
        args.batch_size,
    )

    def run(loaded: Any, task: Any, out: Path) -> str:
        result = find_heads_for(loaded, task, dataclasses.replace(cfg, n_candidates=check_head_sets(args, loaded)))
        write_heads(result, out)
        return heads_markdown(result)

    return _in_folder(args, "heads", run)


def cmd_findings(args: argparse.Namespace) -> int:
    """`mechicl findings`: the head finder over a grid of models x tasks x seeds; resumable; replication summary."""
    import torch  # deferred: imports torch

    from mechicl.runs.findings import load_grid, make_executor, run_grid, summarise  # deferred: imports torch

    keys = (
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
    over = {k: getattr(args, k) for k in keys} | {"models": args.models, "tasks": args.tasks, "seeds": args.seeds}
    spec = load_grid(args.config, **over)
    if args.summarise_only:
        summarise(args.out, spec)
    else:
        torch.set_num_threads(args.threads)
        slurm = dict(kv.split("=", 1) for kv in args.slurm.split(",")) if args.slurm else None
        executor, n = make_executor(args.workers, args.scheduler, slurm, args.out / "submitit")
        run_grid(spec, args.out, executor=executor, n_workers=n)
    print((args.out / "summary" / "summary.md").read_text(encoding="utf-8"))
    print(f"[mechicl] wrote {args.out}/summary (cells in {args.out}/cells)")
    return 0


def cmd_circuit(args: argparse.Namespace) -> int:
    """`mechicl circuit`: label-position patching and sender -> receiver path patching, held-out contexts."""
    from mechicl.runs.circuit import CircuitConfig, run_circuit  # deferred: imports torch

    cfg = CircuitConfig(
        args.model,
        args.task,
        args.k + 1,
        args.n_select,
        args.n_eval,
        args.seed,
        args.seed_eval,
        args.senders,
        args.receivers,
        tuple(p.strip() for p in args.positions.split(",")),
        args.threshold,
    )
    return _in_folder(args, "circuit", lambda m, t, out: run_circuit(m, t, cfg, out)[1])


def cmd_aggregate(args: argparse.Namespace) -> int:
    """`mechicl aggregate`: head projections vs the count and placement of flipped labels; steering check."""
    from mechicl.runs.aggregate import AggregationConfig, run_aggregation  # deferred: imports torch

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
    return _in_folder(args, "aggregate", lambda m, t, out: run_aggregation(m, t, cfg, out)[1])


def cmd_report(args: argparse.Namespace) -> int:
    """`mechicl report`: every analysis on one model and task as one self-contained report.html."""
    from mechicl.runs.report import ReportConfig, rerun_command, run_report  # deferred: imports torch

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

    return _in_folder(args, "report", run)


def cmd_models(args: argparse.Namespace) -> int:
    for name in known_models():
        desc = EMBEDDED[name].description if name in EMBEDDED else "random 2-layer boot_native model for tests"
        if name.startswith("organism-"):
            variant = "".join(f", {x}" for x in name.split("-")[2:])  # s1, s2, unpruned
            desc = f"trained model organism ({name.split('-')[1]} prior{variant}), see docs/organism.md"
        print(f"{name:24s} {desc}{'  (default)' if name == DEFAULT_MODEL else ''}")
    print("Also: a .gguf file, a local Hugging Face model directory, or a Hub id org/name (needs internet).")
    return 0


def tasks_text(doc: str) -> str:
    """``data.tasks``' docstring as plain text: the intro line, then one aligned, wrapped entry per task source."""
    plain = re.sub(r"`+([^`]*)`+", r"\1", doc.strip()).replace("balance=False", "--no-balance")
    intro, entries = plain.splitlines()[0], []
    for line in plain.splitlines()[1:]:
        m = re.match(r"^  (\S.*?)\s{2,}(\S.*)$", line)
        if m:
            entries.append([m.group(1), m.group(2).strip()])
        elif entries and line.startswith("    ") and line.strip():
            entries[-1][1] += " " + line.strip()
    width = max((len(n) for n, _ in entries), default=0) + 2
    lines = [intro, "", "Tasks (--task):"]
    for name, text in entries:
        lines += textwrap.wrap(text, 100, initial_indent=f"  {name:<{width}}", subsequent_indent=" " * (width + 2))
    own = (
        "Your own data: --task file.csv or file.jsonl (columns text,label); --label-names gives the words of integer "
        "labels, --template how an example is written, e.g. 'Review: {input}\\nSentiment: {label}'."
    )
    return "\n".join([*lines, "", *textwrap.wrap(own, 100)])


def cmd_tasks(args: argparse.Namespace) -> int:
    from mechicl.data import tasks  # deferred: imports torch

    print(tasks_text(tasks.__doc__ or ""))
    return 0


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
    "patch": "Exact activation patching between correct- and flipped-label renderings of the same contexts: "
    "heatmaps and tables of the normalised logit difference.",
    "heads": "Find label-aggregation heads: attribution screen, exact patching, then ablation on held-out contexts "
    "against every other head and random head sets; prints a verdict line.",
    "attribute": "Attention attribution that adds up: AttAttr and path integrated gradients beside exact and "
    "first-order patching.",
    "circuit": "Where label information is written and who reads it: label-position patching and sender -> receiver "
    "path patching on held-out contexts.",
    "aggregate": "Does a head's output scale with the evidence? Its direct effect on the flipped-vs-true label logits "
    "at the query against the count and placement of flipped demonstration labels, fitted as sum, vote, "
    "recency or per-position weights (held out), and a steering check with its mean flipped - default output.",
    "report": "Every analysis on one model and task as one offline report.html.",
    "findings": "The head finder over a grid of models x tasks x seeds: screen, confirm and validate on disjoint "
    "context draws, resample ablation at every readout slot, layer/norm-matched controls, CIs over contexts; "
    "finished cells are skipped (resumable); a replication summary with a verdict per head.",
}


def _command(
    sub: Any,
    name: str,
    help: str,
    add: Callable[[argparse.ArgumentParser], None],
    func: Callable[[argparse.Namespace], int],
) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=DESCRIPTIONS.get(name, help))
    add(p)
    p.set_defaults(func=func)
    return p


def _add_organism_parser(sub: Any) -> None:
    org = sub.add_parser(
        "organism",
        help="model organisms: small transformers with a known pre-training prior",
        description="Model organisms: small transformers with a known pre-training prior (docs/organism.md).",
    )
    org_sub = org.add_subparsers(dest="organism_command", required=True)
    train = org_sub.add_parser(
        "train",
        help="train an organism (deterministic; ~5 min on one CPU thread)",
        description="Train an organism (deterministic; ~5 min on one CPU thread) and write its "
        "checkpoint and model card.",
        formatter_class=P.DefaultsFormatter,
    )
    P.organism_train_args(train)
    train.set_defaults(func=cmd_organism_train)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="mechicl", description="Mechanistic interpretability of in-context learning.")
    sub = parser.add_subparsers(dest="command", required=True)
    _command(
        sub,
        "demo",
        "the main job: default model, vader-words, default/random/flipped labels",
        P.behavior_args,
        cmd_behavior,
    )
    _command(
        sub,
        "behavior",
        "accuracy / log-likelihood / entropy against k per label condition",
        P.behavior_args,
        cmd_behavior,
    )
    _command(sub, "run", "run an experiment config (experiments/*.toml) and write its verdict", P.run_args, cmd_run)
    att = _command(
        sub,
        "attention",
        "attention to label tokens, PM and induction scores, saliency; heatmaps and HTML views",
        P.inside_args,
        cmd_inside,
    )
    att.add_argument("--no-saliency", action="store_true", help="skip the attention-saliency backward passes")
    lens = _command(
        sub,
        "lens",
        "logit lens per layer under default vs flipped contexts; the critical layer",
        P.inside_args,
        cmd_inside,
    )
    lens.add_argument(
        "--min-gap", type=fraction, default=0.05, help="accuracy gap that marks the critical layer (default 0.05)"
    )
    _command(
        sub, "dla", "direct logit attribution per head / MLP and the prior-vs-context table", P.inside_args, cmd_inside
    )
    _add_organism_parser(sub)
    _command(
        sub,
        "patch",
        "exact activation patching, correct- vs flipped-label contexts; heatmaps and tables",
        P.patch_args,
        cmd_patch,
    )
    _command(
        sub,
        "heads",
        "find label-aggregation heads: attribution screen, exact patching, ablation vs random heads",
        P.heads_args,
        cmd_heads,
    )
    _command(
        sub,
        "attribute",
        "attention attribution that adds up: AttAttr and path IG vs exact patching",
        P.attribute_args,
        cmd_attribute,
    )
    _command(
        sub, "report", "every analysis on one model and task as one offline report.html", P.report_args, cmd_report
    )
    _command(
        sub,
        "circuit",
        "where label information is written and who reads it: label-position and path patching",
        P.circuit_args,
        cmd_circuit,
    )
    _command(
        sub,
        "aggregate",
        "evidence aggregation: head output vs the number and placement of flipped labels; steering",
        P.aggregate_args,
        cmd_aggregate,
    )
    _command(
        sub,
        "findings",
        "head findings that hold up: held-out stages, matched controls, a grid over models x tasks x seeds",
        P.findings_args,
        cmd_findings,
    )
    sub.add_parser("models", help="list model names", description="List the model names mechicl knows.").set_defaults(
        func=cmd_models
    )
    sub.add_parser("tasks", help="list task names", description="List the task names mechicl knows.").set_defaults(
        func=cmd_tasks
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; exit codes and one-line errors: ``runs.args.run_command``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    return run_command(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
