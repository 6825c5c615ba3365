"""The values `mechicl report` passes between its stages and its sections: sizes (``ReportConfig``) and
results (``NHTest``, ``PatchStage``, ``ReportData``). Kept apart from ``runs.report`` (which computes them) so
that ``runs.report_sections`` (which draws them) imports them without a cycle."""

from __future__ import annotations

import dataclasses
import string
from dataclasses import dataclass
from typing import Any

import pandas as pd

from mechicl.analysis.behavior.curves import BehaviorResult
from mechicl.analysis.behavior.hypotheses import ExperimentConfig
from mechicl.analysis.engine.readout import ReadoutRun
from mechicl.analysis.heads.finder import FindingsConfig, FindingsResult
from mechicl.analysis.patching.exact import PatchResult
from mechicl.data.pairs import PatchPair
from mechicl.errors import ConfigError
from mechicl.runs.attention import AttentionResult
from mechicl.runs.heads import preset_config
from mechicl.runs.inside_batches import InsideConfig


def arbitrary_words(n_classes: int) -> str:
    """The arbitrary condition's default label words: one capital letter per class (``A/B``, ``A/B/C``, ...)."""
    if not 2 <= n_classes <= 26:
        raise ConfigError(
            f"no default arbitrary label words for {n_classes} classes; give them with --arbitrary w1/w2/..."
        )
    return "/".join(string.ascii_uppercase[:n_classes])


@dataclass(frozen=True)
class ReportConfig:
    """Sizes of every stage of `mechicl report` (defaults: a few minutes for gemma3-270m on 2 cores).

    Cost: behaviour ``4 * n_behavior`` forwards of ``k_max + 1``-example contexts; attention, lens and DLA
    about 6 forwards (+ 2 backwards for saliency, + one 0-shot forward per query) of ``n_inside`` contexts;
    patching ``n_patch`` contexts, one forward per (cell, kind) swept plus 2 forwards + 1 backward for
    attribution; the head finder as one `mechicl heads` cell (``FindingsConfig``: ``n_screen``, ``n_confirm``,
    ``n_eval`` validation contexts, ``n_candidates``, ``n_top``, ``n_control`` matched controls per head).
    """

    model: str
    task: str = "vader-words"
    seed: int = 0
    k_max: int = 12  # behaviour: contexts hold k_max + 1 examples
    n_behavior: int = 32  # contexts per label condition (shared draws)
    arbitrary: str | None = None  # replacement label words of the arbitrary condition (None: ``arbitrary_words``)
    n_examples: int = 9  # examples per context (query included) for attention, lens, DLA, patching, heads
    n_inside: int = 16  # contexts for attention, lens, DLA
    k_min: int = 4  # readout slots with k >= k_min are averaged in attention, lens, DLA
    n_patch: int = 3  # contexts for the patching sweeps
    n_screen: int = 8  # head finder: screening contexts
    n_confirm: int = 16  # head finder: confirmation contexts
    n_eval: int = 32  # head finder: validation contexts
    n_candidates: int = 6  # screened heads confirmed
    n_top: int = 3  # confirmed heads validated against matched controls
    n_prior: int = 12  # prior vs context: contexts of the validate draw (routes, dose, prior heads; k_min 1)
    n_control: int = 5  # matched control heads per validated head
    resid_examples: int = 2  # residual x position patching covers the last this-many examples (0 = every position)
    batch_size: int = 8
    top: int = 6
    attribution: bool = True  # AttAttr (integrated gradients over attention) on the patching pair, both renderings
    attribution_steps: int = 6  # its Riemann steps; cost about 2 (m + 2) forward + backward pairs per layer run
    # exact sweeps of the patching stage (--full adds head_out_label: head outputs at the label positions)
    patch_kinds: tuple[str, ...] = ("head_out", "head_out_readout", "resid")
    circuit_positions: tuple[str, ...] = ("all",)  # sender positions of the circuit stage's path patching
    n_circuit: int = 8  # held-out path patching among the headline heads: contexts of task rows no finder draw used
    findings: str | None = None  # a `mechicl findings` grid folder read into section 7 (no forwards)
    circuit: str | None = None  # a `mechicl circuit` run folder read into section 7 (no forwards)

    def __post_init__(self) -> None:
        if not 1 <= self.k_min < self.n_examples or self.k_max < 1:
            raise ConfigError(
                f"need 1 <= k_min < n_examples and k_max >= 1 (got k_min={self.k_min}, "
                f"n_examples={self.n_examples}, k_max={self.k_max})"
            )

    @classmethod
    def sized(cls, size: str, **kw: Any) -> "ReportConfig":
        """``"default"``, ``"quick"`` (seconds on tiny models, for tests) or ``"full"`` (paper-grade sizes)."""
        presets = {
            "default": {},
            "quick": dict(
                k_max=6,
                n_behavior=8,
                n_examples=6,
                n_inside=6,
                k_min=2,
                n_patch=3,
                n_screen=4,
                n_confirm=4,
                n_eval=8,
                n_candidates=4,
                n_top=2,
                n_control=3,
                attribution_steps=4,
                n_circuit=4,
            ),
            "full": dict(
                k_max=16,
                n_behavior=128,
                n_examples=17,
                n_inside=64,
                n_patch=16,
                n_screen=16,
                n_confirm=32,
                n_eval=64,
                n_candidates=12,
                resid_examples=0,
                n_circuit=32,
                attribution_steps=20,
                patch_kinds=("head_out", "head_out_label", "head_out_readout", "resid"),
                circuit_positions=("label", "all"),
            ),
        }
        if size not in presets:
            raise ConfigError(f"unknown report size {size!r}; use one of {', '.join(presets)}")
        return cls(**{**presets[size], **kw})

    def inside(self) -> InsideConfig:
        return InsideConfig(
            self.model, self.task, self.n_inside, self.n_examples, self.k_min, self.seed, self.batch_size, self.top
        )

    def fit_heads(self, n_heads_total: int) -> ReportConfig:
        """The finder's sizes on a model with ``n_heads_total`` heads: ``n_top + n_control`` may not exceed them
        (each validated head needs matched controls among the others); smaller models validate fewer heads
        against fewer controls, said on stdout, instead of failing after the report's earlier stages."""
        if self.n_top + self.n_control <= n_heads_total:
            return self
        n_top = max(1, min(self.n_top, n_heads_total // 2))
        fitted = dataclasses.replace(self, n_top=n_top, n_control=max(1, min(self.n_control, n_heads_total - n_top)))
        print(
            f"[mechicl] the model has {n_heads_total} heads: the head finder validates {fitted.n_top} against "
            f"{fitted.n_control} matched controls each (asked: {self.n_top}, {self.n_control})",
            flush=True,
        )
        return fitted

    def heads(self) -> FindingsConfig:
        """The head finder's cell: `mechicl heads` with these sizes (its other settings at their defaults)."""
        return preset_config(
            k=self.n_examples - 1,
            k_min=self.k_min,
            n_screen=self.n_screen,
            n_confirm=self.n_confirm,
            n_validate=self.n_eval,
            n_candidates=self.n_candidates,
            n_top=self.n_top,
            n_control=self.n_control,
            seed=self.seed,
        )


@dataclass(frozen=True)
class NHTest:
    """One NH config's primary tests run on the report's behaviour scores (ks clipped to ``k_max``)."""

    config: ExperimentConfig
    tests: pd.DataFrame
    verdict: str


@dataclass(frozen=True)
class PatchStage:
    """Exact sweeps (denoise) and attribution patching of head outputs on the same pair."""

    results: tuple[PatchResult, ...]
    window: tuple[int, int]  # positions [lo, hi) of the residual sweep
    attribution: pd.DataFrame  # layer, head, attribution, exact
    agreement: dict[str, float]
    description: str
    pair: PatchPair  # the contexts every number of the stage comes from


@dataclass(frozen=True)
class ReportData:
    """Everything the sections are drawn from."""

    config: ReportConfig
    behavior: BehaviorResult
    nh: list[NHTest]
    attention: AttentionResult
    lens: Any  # analysis.inside.lens.Lens
    dla: pd.DataFrame
    prior_vs_context: pd.DataFrame
    patch: PatchStage
    heads: FindingsResult  # one `mechicl heads` cell (runs.heads.find_heads_for)
    n_classes: int
    attattr: pd.DataFrame | None = None  # runs.attribute.attattr_groups on the patching pair (``--attribution``)
    runs: tuple[ReadoutRun, ReadoutRun] | None = None  # the shared default/flipped runs (attention view of context 0)
    prior: Any = None  # runs.prior.PriorTables on the validated heads (None without a validated head)
    circuit: Any = None  # runs.report_circuit.CircuitStage among the headline heads (None without a validated head)


def headline_heads(heads: FindingsResult) -> list[str]:
    """The heads every section is read against: the finder's validated heads above their matched controls, or its
    validated (top) heads when none is (empty when the cell had no in-context effect to attribute)."""
    v = heads.validate
    if not heads.has_effect or not len(v):
        return []
    return list(v.heads[v.above_control]) or list(v.heads)
