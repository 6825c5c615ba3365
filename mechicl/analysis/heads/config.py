"""One findings cell's configuration: draw sizes, the ablation, controls, statistics, and the pre-registration
fields (``heads``, ``fresh_after``). Checked when made, before any compute. Cost: none."""

from __future__ import annotations

from dataclasses import dataclass

from mechicl.analysis.engine.hooks import Head
from mechicl.analysis.heads.ablation import MODES
from mechicl.analysis.heads.modes import FINDINGS_DEFAULT
from mechicl.analysis.stats import check_draws
from mechicl.data.names import parse_heads
from mechicl.errors import ConfigError


@dataclass(frozen=True)
class FindingsConfig:
    """One cell of the findings grid. Cost on Gemma-3-270M: see ``docs/findings.md`` (measured)."""

    k: int = 16  # demonstrations before the last query: contexts hold k + 1 examples
    k_min: int = 8  # the first readout slot measured (slots k_min..k)
    n_screen: int = 8
    n_confirm: int = 24
    n_validate: int = 32
    n_candidates: int = 8
    screen: str = "exact"  # "exact": every head ablated (one resample draw); "attribution": first-order only
    n_top: int = 3
    ablation: str = FINDINGS_DEFAULT  # interchange (analysis.heads.modes): chosen by the ground-truth benchmark
    n_resample: int = 2
    control: str = "layer"  # "layer": same layer (widened), nearest in output norm; "norm": nearest in norm
    n_control: int = 5
    n_boot: int = 2000
    n_perm: int = 4000
    seed: int = 0
    heads: str = ""  # pre-registered heads ("L10H3 L11H2"): validated as given, no screening or confirmation
    fresh_after: str = ""  # seeds ("0 1 2") whose rows (three-stage draws, these sizes) no pool may hold

    def __post_init__(self) -> None:
        check_draws(self.n_boot)  # degenerate draw counts fail here, before any compute (issue 30)
        check_draws(self.n_perm, "n_perm")
        if not 0 <= self.k_min <= self.k:
            raise ConfigError(f"need 0 <= k_min <= k, got k_min={self.k_min}, k={self.k}")
        if min(self.n_screen, self.n_confirm, self.n_validate) < 4:
            raise ConfigError("each stage needs at least 4 contexts (resampling and intervals)")
        if self.ablation not in MODES:
            raise ConfigError(f"ablation must be one of {tuple(MODES)}, got {self.ablation!r}")
        if self.screen not in ("exact", "attribution"):
            raise ConfigError(f"screen must be 'exact' or 'attribution', got {self.screen!r}")
        if self.control not in ("layer", "norm"):
            raise ConfigError(f"control must be 'layer' or 'norm', got {self.control!r}")
        if self.n_top < 1 or self.n_candidates < self.n_top or self.n_control < 1:
            raise ConfigError("need 1 <= n_top <= n_candidates and n_control >= 1")
        if self.preregistered and len(set(self.preregistered)) != len(self.preregistered):
            raise ConfigError(f"heads lists a head twice ({self.heads!r}); list each once")
        self.excluded_seeds  # noqa: B018 - parsed here so a bad value fails before any compute

    @property
    def preregistered(self) -> tuple[Head, ...]:
        """The pre-registered heads (``heads`` parsed), in the order given; () = discover them."""
        return parse_heads(self.heads)

    @property
    def excluded_seeds(self) -> tuple[int, ...]:
        try:
            seeds = tuple(int(x) for x in self.fresh_after.replace(",", " ").split())
        except ValueError:
            raise ConfigError(f"fresh_after must list seeds, e.g. '0 1 2'; got {self.fresh_after!r}") from None
        if any(x < 0 for x in seeds):
            raise ConfigError(f"fresh_after must list seeds >= 0, got {self.fresh_after!r}")
        return seeds

    @property
    def discovery_sizes(self) -> dict[str, int]:
        return {"screen": self.n_screen, "confirm": self.n_confirm, "validate": self.n_validate}

    @property
    def sizes(self) -> dict[str, int]:
        """The stages drawn: all three, or the validation draw alone for pre-registered heads."""
        return {"validate": self.n_validate} if self.preregistered else self.discovery_sizes


def check_head_pool(cfg: FindingsConfig, n_layers: int, n_heads: int) -> None:
    """Before any compute: each of the ``n_top`` validated heads needs ``n_control`` matched controls among the
    model's other heads that are not validated themselves, so ``n_top + n_control`` may not exceed its heads."""
    total = n_layers * n_heads
    n_top = len(cfg.preregistered) or cfg.n_top
    if n_top + cfg.n_control > total:
        raise ConfigError(
            f"the model has {total} heads ({n_layers} layers x {n_heads}): too few to validate {n_top} heads "
            f"against {cfg.n_control} matched controls each; lower n_top / n_control (--n-top, --n-control) so that "
            f"n_top + n_control <= {total}"
        )
