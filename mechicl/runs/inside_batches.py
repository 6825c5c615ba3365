"""What `mechicl attention | lens | dla` share: the config (from the flags), the default/flipped batches on the
same draws, one shared forward per condition, and the summary header and footer."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass

from mechicl.analysis.engine.hooks import FINAL
from mechicl.analysis.engine.readout import ReadoutRun, readout_run
from mechicl.analysis.inside.attention import pattern_names
from mechicl.analysis.inside.dla import dla_names
from mechicl.analysis.inside.lens import lens_names
from mechicl.data.prompts import PromptBatch, build_prompt_batch, sample_contexts
from mechicl.data.task import Task
from mechicl.errors import ConfigError, PromptError
from mechicl.models.base import LoadedModel
from mechicl.runs.folder import Clock, RunFolder


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


def inside_config(args: argparse.Namespace) -> InsideConfig:
    """The config of `mechicl attention | lens | dla` from their shared flags (checked before anything loads)."""
    if args.k_min > args.k:
        raise ConfigError(
            f"--k-min {args.k_min} is larger than --k {args.k}: no readout slot has that many earlier "
            f"examples; lower --k-min or raise --k"
        )
    return InsideConfig(
        args.model, args.task, args.n_contexts, args.k + 1, args.k_min, args.seed, args.batch_size, args.top
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
