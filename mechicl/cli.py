"""Command line: ``mechicl demo | behavior | run | attention | lens | dla | patch | heads | attribute | organism train | models | tasks``.

Each command parses its flags, loads the task and model, and hands over to its module in
``mechicl.runs`` (the layers: cli -> runs -> analysis -> data/models). Commands import their run
module when they run, not at start-up, so that ``mechicl models`` or ``--help`` answers without
loading torch and TransformerLens (about 3.5 s here); there is no import cycle to avoid. Every
function-level import below is such a deferral (each of those modules pulls in torch; the light
ones, ``data.conditions`` and ``data.task``, are imported at the top).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mechicl.data.conditions import parse_conditions
from mechicl.data.task import check_tokenization
from mechicl.errors import ConfigError
from mechicl.models.registry import DEFAULT_MODEL, EMBEDDED, known_models
from mechicl.runs.args import Parser, add_behavior_args, add_inside_args, add_model_task, add_run_args, fraction, int_at_least, run_command, set_sizes, words


def _load(model: str, threads: int | None, task: Any = None) -> tuple[Any, float]:
    """Set torch's thread count (if given), load ``model`` and report it; check that its tokenizer reads
    ``task`` (``check_tokenization``) before any compute. Returns it and the start time."""
    import torch

    # deferred to run time: these modules import torch (see the module docstring)
    from mechicl.models.loading import load_model

    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    loaded = load_model(model)
    print(f"[mechicl] loaded {loaded.name} ({loaded.source}) in {time.perf_counter() - t0:.1f} s", flush=True)
    if task is not None:
        check_tokenization(task, loaded.tokenizer)
    return loaded, t0


def _in_folder(args: argparse.Namespace, kind: str, run: Callable[[Any, Any, Path], str]) -> int:
    """A run command's shared path: check the model and --out, load the task (``args.model/task/seed/label_names``),
    then load the model and call ``run(loaded, task, folder)`` inside the staged run folder; print its text."""
    # deferred to run time: these modules import torch (see the module docstring)
    from mechicl.data.tasks import load_task
    from mechicl.runs.preflight import prepare, staged_args

    out = prepare(args, kind, args.model, args.task)
    task = load_task(args.task, seed=args.seed, label_names=args.label_names)
    with staged_args(args, out) as tmp:
        loaded, t0 = _load(args.model, args.threads, task)
        text = run(loaded, task, tmp)
    print(text)
    _done(out, t0)
    return 0


def _done(out: Any, t0: float) -> None:
    """Report the run folder ``out`` (a path or a ``RunFolder``) and the wall time."""
    out = Path(getattr(out, "path", out))
    print(f"[mechicl] wrote {', '.join(sorted(p.name for p in out.iterdir()))} to {out}")
    print(f"[mechicl] total wall time {time.perf_counter() - t0:.0f} s")


def cmd_behavior(args: argparse.Namespace) -> int:
    # deferred to run time: these modules import torch (see the module docstring)
    from mechicl.analysis.behavior import BehaviorConfig
    from mechicl.data.tasks import load_task
    from mechicl.runs.behavior import run_behavior, write_behavior
    from mechicl.runs.preflight import prepare, staged_args

    conditions = tuple(c.name for c in parse_conditions(args.conditions))  # validate before loading
    if not conditions:
        raise ConfigError("--conditions is empty; give a comma list such as default,random,flipped")
    cfg = BehaviorConfig(args.model, args.task, conditions, args.k_max, args.n_contexts, args.seed, args.batch_size,
                         args.multi_token, args.label_names)
    out = prepare(args, "behavior", cfg.model, cfg.task)
    task = load_task(cfg.task, seed=cfg.seed, label_names=cfg.label_names)
    with staged_args(args, out) as tmp:
        loaded, t0 = _load(cfg.model, args.threads, task)
        print(f"[mechicl] task {task.name}: {task.description}", flush=True)
        result = run_behavior(loaded, task, cfg)
        summary = (write_behavior(result, tmp).path / "summary.md").read_text()
    print(summary)
    _done(out, t0)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    # deferred to run time: these modules import torch (see the module docstring)
    from mechicl.data.tasks import load_task
    from mechicl.runs.experiments import load_config, run_experiment, write_experiment
    from mechicl.runs.preflight import prepare, staged_args

    names = list(args.label_names) if args.label_names else None
    cfg = load_config(args.config, model=args.model, task=args.task, n_contexts=args.n_contexts, seed=args.seed,
                      label_names=names)
    out = prepare(args, cfg.name, cfg.model, cfg.task)
    task = load_task(cfg.task, seed=cfg.seed, label_names=cfg.label_names)
    with staged_args(args, out) as tmp:
        loaded, t0 = _load(cfg.model, args.threads, task)
        print(f"[mechicl] {cfg.name}: {cfg.hypothesis} on {loaded.name} / {cfg.task}, {len(cfg.conditions)} conditions", flush=True)
        result = run_experiment(cfg, loaded, task=task)
        write_experiment(result, tmp, Path(args.config).read_text(encoding="utf-8"))
    print(result.verdict)
    _done(out, t0)
    return 0


def cmd_inside(args: argparse.Namespace) -> int:
    """`mechicl attention | lens | dla`: one look inside the model, on default vs flipped contexts."""
    # deferred to run time: these modules import torch (see the module docstring)
    from mechicl.runs.attention import report_attention
    from mechicl.runs.inside import InsideConfig, report_dla, report_lens

    cfg = InsideConfig(args.model, args.task, args.n_contexts, args.n_examples, args.k_min, args.seed,
                       args.batch_size, args.top)
    if args.command == "attention":
        return _in_folder(args, "attention", lambda m, t, out: report_attention(m, t, cfg, out, saliency=not args.no_saliency))
    if args.command == "lens":
        return _in_folder(args, "lens", lambda m, t, out: report_lens(m, t, cfg, out, min_gap=args.min_gap))
    return _in_folder(args, "dla", lambda m, t, out: report_dla(m, t, cfg, out))

def cmd_organism_train(args: argparse.Namespace) -> int:
    """`mechicl organism train`: train an organism and write its checkpoint and model card."""
    # deferred to run time: these modules import torch (see the module docstring)
    from mechicl.data.organism import LanguageConfig
    from mechicl.models.organism import OrganismConfig
    from mechicl.runs.organism import train_and_save

    given = {k: v for k, v in [("p_arbitrary", args.p_arbitrary), ("label_noise", args.label_noise)] if v is not None}
    try:
        lang = LanguageConfig.from_prior_strength(args.prior_strength, **given)
        recipe = {k: v for k, v in [("steps", args.steps), ("keep_heads", args.keep_heads),
                                     ("prune_steps", args.prune_steps)] if v is not None}
        cfg = OrganismConfig(language=lang, seed=args.seed, **recipe)
    except ValueError as e:
        print(f"mechicl: error: bad organism recipe: {e}", file=sys.stderr)
        return 2
    out = args.out or Path("runs") / f"organism-s{args.prior_strength:g}-seed{args.seed}.safetensors"
    card = train_and_save(cfg, out, name=out.stem)
    print(card.read_text())
    print(f"[mechicl] wrote {out} and {card}")
    return 0


def cmd_patch(args: argparse.Namespace) -> int:
    """`mechicl patch`: exact activation-patching sweeps, correct- vs flipped-label contexts."""
    # deferred to run time: these modules import torch (see the module docstring)
    from mechicl.analysis.patching import KINDS
    from mechicl.runs.patch import PatchRunConfig, run_patch

    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        print(f"mechicl: error: unknown sweep kind(s) {bad}; use a comma list of {', '.join(KINDS)}", file=sys.stderr)
        return 2
    directions = ("denoise", "noise") if args.direction == "both" else (args.direction,)
    cfg = PatchRunConfig(args.model, args.task, tuple(kinds), directions, args.n_contexts, args.n_examples, args.last_m,
                         args.max_rows, args.top, args.seed)
    return _in_folder(args, "patch", lambda m, t, out: run_patch(m, t, cfg, out)[1])


def cmd_attribute(args: argparse.Namespace) -> int:
    """`mechicl attribute`: AttAttr and path IG beside exact and first-order patching, correct- vs flipped-label contexts."""
    # deferred to run time: these modules import torch (see the module docstring)
    from mechicl.runs.attribute import AttributeConfig, run_attribute

    cfg = AttributeConfig(args.model, args.task, args.n_contexts, args.n_examples, args.steps, args.completeness_steps,
                          args.metric, args.baseline, args.last_m, args.max_rows, args.top, args.view_heads, args.seed)
    return _in_folder(args, "attribute", lambda m, t, out: run_attribute(m, t, cfg, out)[1])


def cmd_heads(args: argparse.Namespace) -> int:
    """`mechicl heads`: find label-aggregation heads and validate them by ablation against random head sets."""
    # deferred to run time: these modules import torch (see the module docstring)
    from mechicl.analysis.heads import HeadFinderConfig
    from mechicl.runs.heads import find_heads_for, heads_markdown, write_heads
    from mechicl.runs.preflight import check_head_sets

    check_head_sets(args)
    cfg = HeadFinderConfig(args.model, args.task, args.n_examples, args.n_screen, args.n_eval, args.candidates,
                           args.set_sizes, args.n_control, args.ablation, args.seed)

    def run(loaded: Any, task: Any, out: Path) -> str:
        check_head_sets(args, loaded)
        result = find_heads_for(loaded, task, cfg)
        write_heads(result, out)
        return heads_markdown(result)

    return _in_folder(args, "heads", run)


def cmd_circuit(args: argparse.Namespace) -> int:
    """`mechicl circuit`: label-position patching and sender -> receiver path patching, held-out contexts."""
    # deferred to run time: these modules import torch (see the module docstring)
    from mechicl.runs.circuit import CircuitConfig, run_circuit

    cfg = CircuitConfig(args.model, args.task, args.n_examples, args.n_select, args.n_eval, args.seed, args.seed_eval,
                        args.senders, args.receivers, tuple(p.strip() for p in args.positions.split(",")), args.threshold)
    return _in_folder(args, "circuit", lambda m, t, out: run_circuit(m, t, cfg, out)[1])


def _add_circuit_parser(sub: Any) -> None:
    cir = sub.add_parser("circuit", help="where label information is written and who reads it: label-position and path patching")
    add_model_task(cir)
    for flag, default, low, what in (("--n-examples", 9, 2, "examples per context incl. the query"), ("--n-select", 8, 1,
                                     "contexts that choose the heads"), ("--n-eval", 16, 2, "held-out contexts for every "
                                     "reported number"), ("--senders", 4, 1, "sender heads on large models"), ("--receivers",
                                     4, 1, "receiver heads on large models"), ("--seed-eval", 1, 0, "seed of the held-out contexts")):
        cir.add_argument(flag, type=int_at_least(low), default=default, help=f"{what} (default {default})")
    cir.add_argument("--positions", default="label,all", help="sender positions: comma list of label, input, readout, all")
    cir.add_argument("--threshold", type=float, default=0.05, help="smallest |path effect| drawn as an edge (default 0.05)")
    add_run_args(cir)  # --seed (of the selection contexts), --threads, --out, --overwrite, --label-names
    cir.set_defaults(func=cmd_circuit)


def cmd_report(args: argparse.Namespace) -> int:
    """`mechicl report`: every analysis on one model and task as one self-contained report.html."""
    # deferred to run time: these modules import torch (see the module docstring)
    from mechicl.data.tasks import load_task
    from mechicl.runs.preflight import prepare, staged_args
    from mechicl.runs.report import ReportConfig, run_report

    size = "quick" if args.quick else "full" if args.full else "default"
    extra = {"attribution": True} if args.attribution else {}
    cfg = ReportConfig.sized(size, model=args.model, task=args.task, seed=args.seed, arbitrary=args.arbitrary, **extra)
    command = (f"mechicl report --model {args.model} --task {args.task} --seed {args.seed} --arbitrary {args.arbitrary}"
               + {"quick": " --quick", "full": " --full", "default": ""}[size] + (" --attribution" if args.attribution else "")
               + (f" --label-names {','.join(args.label_names)}" if args.label_names else ""))
    out = prepare(args, "report", args.model, args.task)
    task = load_task(args.task, seed=args.seed, label_names=args.label_names)
    with staged_args(args, out) as tmp:
        loaded, t0 = _load(args.model, args.threads, task)
        run_report(loaded, task, cfg, tmp, command)
    print(f"[mechicl] report: {out / 'report.html'}")
    _done(out, t0)
    return 0


def _add_report_parser(sub: Any) -> None:
    rep = sub.add_parser("report", help="every analysis on one model and task as one offline report.html")
    add_model_task(rep)
    size = rep.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="tiny sizes (seconds on tiny models; for tests)")
    size.add_argument("--full", action="store_true", help="paper-grade sizes (much slower)")
    rep.add_argument("--arbitrary", default="A/B", help="label words of the arbitrary condition (default A/B)")
    rep.add_argument("--attribution", action="store_true",
                     help="add attention attribution (AttAttr) to 'Who looks at labels' (on with --quick and --full; slower)")
    add_run_args(rep)
    rep.set_defaults(func=cmd_report)


def cmd_models(args: argparse.Namespace) -> int:
    for name in known_models():
        desc = EMBEDDED[name].description if name in EMBEDDED else "random 2-layer boot_native model for tests"
        if name.startswith("organism-"):
            desc = f"trained model organism ({name.split('-')[1]} prior), see docs/organism.md"
        print(f"{name:14s} {desc}{'  (default)' if name == DEFAULT_MODEL else ''}")
    print("Also: a .gguf file, a local Hugging Face model directory, or a Hub id org/name (needs internet).")
    return 0


def cmd_tasks(args: argparse.Namespace) -> int:
    # deferred to run time: these modules import torch (see the module docstring)
    from mechicl.data import tasks

    print(tasks.__doc__)
    return 0


def _add_organism_parser(sub: Any) -> None:
    org = sub.add_parser("organism", help="model organisms: small transformers with a known pre-training prior")
    org_sub = org.add_subparsers(dest="organism_command", required=True)
    org_train = org_sub.add_parser("train", help="train an organism (deterministic; ~5 min on one CPU thread)")
    org_train.add_argument("--prior-strength", type=float, required=True,
                           help="P(default label map | sentiment labels), in [0, 1]; shipped: 0.97 strong, 0.6 weak")
    org_train.add_argument("--p-arbitrary", type=float, default=None, help="share of sequences with arbitrary letter labels")
    org_train.add_argument("--label-noise", type=float, default=None, help="chance that a shown label is the other class's")
    org_train.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the shipped recipe's)")
    org_train.add_argument("--keep-heads", type=int, default=None,
                           help="pruning stage: last-layer heads kept (default 1; 0 = no pruning stage)")
    org_train.add_argument("--prune-steps", type=int, default=None, help="steps after pruning (default 1000)")
    org_train.add_argument("--seed", type=int, default=0)
    org_train.add_argument("--out", type=Path, default=None, help="checkpoint path (.safetensors); a model card .md is written beside it")
    org_train.set_defaults(func=cmd_organism_train)


def _add_causal_parsers(sub: Any) -> None:
    pat = sub.add_parser("patch", help="exact activation patching, correct- vs flipped-label contexts; heatmaps and tables")
    add_model_task(pat)
    pat.add_argument("--kinds", default="resid,head_out",
                     help="comma list of resid, attn_out, mlp_out, head_out, head_out_label, head_out_readout, "
                          "head_v_label, head_pattern_label (default resid,head_out)")
    pat.add_argument("--direction", choices=["denoise", "noise", "both"], default="both",
                     help="denoise = clean into corrupted, noise = corrupted into clean (default both)")
    _add_pair_args(pat, max_rows=64, top=5, top_help="cells listed per sweep in the summary")
    add_run_args(pat)
    pat.set_defaults(func=cmd_patch)
    hds = sub.add_parser("heads", help="find label-aggregation heads: attribution screen, exact patching, ablation vs random heads")
    add_model_task(hds)
    hds.add_argument("--n-examples", type=int_at_least(2), default=17, help="examples per context incl. the query (default 17: k = 16)")
    hds.add_argument("--n-screen", type=int_at_least(1), default=16, help="contexts for attribution and exact patching (default 16)")
    hds.add_argument("--n-eval", type=int_at_least(2), default=64, help="held-out contexts for ablation (default 64)")
    hds.add_argument("--candidates", type=int_at_least(1), default=12, help="heads confirmed with exact patching (default 12)")
    hds.add_argument("--set-sizes", type=set_sizes, default=(1, 2, 4), help="sizes of the top-n head sets ablated (default 1,2,4)")
    hds.add_argument("--n-control", type=int_at_least(1), default=200, help="random head sets per size (default 200)")
    hds.add_argument("--ablation", choices=["mean", "zero"], default="mean", help="ablation for sets and control (default mean)")
    add_run_args(hds)
    hds.set_defaults(func=cmd_heads)
    att = sub.add_parser("attribute", help="attention attribution that adds up: AttAttr and path IG vs exact patching")
    add_model_task(att)
    att.add_argument("--steps", type=int_at_least(1), default=20, help="Riemann steps (midpoint rule) of both IGs (default 20)")
    att.add_argument("--completeness-steps", type=set_sizes, default=(1, 5, 20, 50),
                     help="step counts at which path-IG completeness is reported (default 1,5,20,50)")
    att.add_argument("--metric", choices=["logit_diff", "prob"], default="logit_diff",
                     help="AttAttr metric at the query slot: shown-label logit difference or P(shown label) (default logit_diff)")
    att.add_argument("--baseline", choices=["uniform", "zero"], default="uniform",
                     help="AttAttr path start: uniform causal attention, or 0 * A as in Hao et al. (degenerate with a "
                          "post-attention norm, e.g. Gemma-3; default uniform)")
    _add_pair_args(att, max_rows=32, top=10, top_help="heads listed; k of the top-k overlap")
    att.add_argument("--view-heads", type=int_at_least(1), default=4, help="heads in attribution_view.html (default 4)")
    add_run_args(att)
    att.set_defaults(func=cmd_attribute)


def _add_pair_args(p: argparse.ArgumentParser, max_rows: int, top: int, top_help: str) -> None:
    """The flags of commands that compare correct- with flipped-label renderings of the same contexts (a pair)."""
    p.add_argument("--n-contexts", type=int_at_least(1), default=4, help="contexts (default 4)")
    p.add_argument("--n-examples", type=int_at_least(2), default=8, help="examples per context, the last is the query (default 8)")
    p.add_argument("--last-m", type=int_at_least(1), default=None, help="flip only the last m demonstration labels")
    p.add_argument("--max-rows", type=int_at_least(1), default=max_rows, help=f"rows per batched forward (memory; default {max_rows})")
    p.add_argument("--top", type=int_at_least(1), default=top, help=f"{top_help} (default {top})")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="mechicl", description="Mechanistic interpretability of in-context learning.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="the main job: default model, vader-words, default/random/flipped labels")
    add_behavior_args(demo, "default,random,flipped")
    demo.set_defaults(func=cmd_behavior)
    beh = sub.add_parser("behavior", help="accuracy / log-likelihood / entropy against k per label condition")
    add_behavior_args(beh, "default,random,flipped")
    beh.set_defaults(func=cmd_behavior)
    run = sub.add_parser("run", help="run an experiment config (experiments/*.toml) and write its verdict")
    run.add_argument("config", type=Path, help="TOML experiment config, e.g. experiments/nh1_random_labels.toml")
    run.add_argument("--model", default=None, help="override the config's model")
    run.add_argument("--task", default=None, help="override the config's task (name or .csv/.jsonl path)")
    run.add_argument("--n-contexts", type=int_at_least(2), default=None, help="override the number of context draws")
    run.add_argument("--label-names", type=words, default=None, help="override the config's label_names (file tasks with integer labels)")
    add_run_args(run, label_names=False, seed=None)
    run.set_defaults(func=cmd_run)
    att = sub.add_parser("attention", help="attention to label tokens, PM and induction scores, saliency; heatmaps and HTML views")
    add_inside_args(att, 32)
    att.add_argument("--no-saliency", action="store_true", help="skip the attention-saliency backward passes")
    att.set_defaults(func=cmd_inside)
    lens = sub.add_parser("lens", help="logit lens per layer under default vs flipped contexts; the critical layer")
    add_inside_args(lens, 32)
    lens.add_argument("--min-gap", type=fraction, default=0.05, help="accuracy gap that marks the critical layer (default 0.05)")
    lens.set_defaults(func=cmd_inside)
    dla = sub.add_parser("dla", help="direct logit attribution per head / MLP and the prior-vs-context table")
    add_inside_args(dla, 32)
    dla.set_defaults(func=cmd_inside)
    _add_organism_parser(sub)
    _add_causal_parsers(sub)
    _add_report_parser(sub)
    _add_circuit_parser(sub)
    sub.add_parser("models", help="list model names").set_defaults(func=cmd_models)
    sub.add_parser("tasks", help="list task names").set_defaults(func=cmd_tasks)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; exit codes and one-line errors: ``runs.args.run_command``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    return run_command(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
