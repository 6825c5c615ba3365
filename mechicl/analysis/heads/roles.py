"""What a head (or head set) does, from four label-specific effects on one draw of contexts (issue 27, item 2).

A head that closes the correct-vs-flipped gap need not read the shown labels: a head that carries the query's
class, or the pre-trained answer, pushes P(true) toward chance in both conditions and "closes" the gap too. So
every validated head and the top set get four effects, each with a 95% context-bootstrap CI:

- ``interchange``: its output at the readout slots swapped between the correct- and flipped-label renderings of
  the *same* context (``analysis.heads.ablation``, mode ``interchange``), as a share of the gap (0..2: 1 = the
  swap removes the whole gap, 2 = it reverses it). Only what the head says about the shown labels changes.
- ``ablated_correct`` / ``ablated_flipped``: ΔP(true) when its output is replaced by the same condition's mean
  (mode ``mean_condition``: nothing of the other condition is written in), in correct- and flipped-label contexts.
- ``d_p_zero_shot``: ΔP(true) at k = 0 when its output is resampled from other queries' zero-shot runs.

**Roles** (``head_role``, a decision list; the margin is ``ZERO_SHOT_MARGIN`` x the lower 95% bound of the cell's
gap in P(true), so "about 0 at zero shot" is sized by the in-context effect the cell can show):

1. ``label``: the interchange CI lies above 0 and the zero-shot CI lies inside +-margin. Only these are label heads.
2. ``label+prior``: the interchange CI lies above 0 and the zero-shot CI excludes 0 and reaches past the margin:
   it carries the shown labels *and* moves the answer with no labels in context (not a pure label head).
3. ``prior``: no label signal (interchange CI not above 0); the zero-shot CI excludes 0 and reaches past the
   margin: it carries the answer the model gives without context.
4. ``class``: no label signal, no zero-shot effect past the margin, but the condition-matched ablation moves
   P(true) in context (either condition's CI clear of 0 and not inside +-margin): it carries something about the
   query (its class), whatever labels are shown.
5. ``generic``: none of these (no effect of its own that the four measurements resolve).
6. ``unresolved``: a label signal whose zero-shot CI is neither inside the margin nor clear of 0 (too wide).

On the constructed organisms (every head's role set by hand, ``models.constructed.planted``) these rules give the
planted roles: ``tests/analysis/heads/test_roles.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from mechicl.analysis.engine.hooks import Head, fmt_heads, head_masks
from mechicl.analysis.engine.stepper import ReadoutStepper
from mechicl.analysis.heads.ablation import HeadAblation, derangements, p_true
from mechicl.analysis.stats import mean_ci

ZERO_SHOT_MARGIN = 0.25  # x the lower bound of the cell's in-context gap in P(true)
TOL = 1e-6  # effects within this of 0 are round-off (an organism head that writes nothing gives +-1e-17)
ROLE_ABLATION = "mean_condition"
ROLES = ("label", "label+prior", "prior", "class", "generic", "unresolved")
EFFECTS = ("interchange", "ablated_correct", "ablated_flipped", "d_p_zero_shot")


def zero_shot_effect(
    zs: ReadoutStepper, sets: Sequence[Sequence[Head]], n_resample: int, n_boot: int, seed: int
) -> pd.DataFrame:
    """ΔP(true) at k = 0 when each head set is resample-ablated with other queries' zero-shot outputs.

    Cost: ``n_resample`` runs of the zero-shot queries per set (one forward each, batched over sets)."""
    y = zs.batch.true_labels[:, -1]
    base = p_true(zs.base_logits, y).numpy()
    masks = head_masks(sets, zs.n_layers, zs.n_heads)
    runs = [zs.run(masks, zs.z[d]) for d in derangements(zs.n_contexts, n_resample, seed)]
    d = np.mean([p_true(r, y).numpy() for r in runs], 0) - base[None]  # [n, b]
    m, lo, hi = mean_ci(d, n_boot=n_boot, seed=seed)
    return pd.DataFrame(
        {
            "heads": [fmt_heads(s) for s in sets],
            "d_p_zero_shot": m,
            "d_p_zero_shot_ci_low": lo,
            "d_p_zero_shot_ci_high": hi,
        }
    )


def label_specific_effects(
    abl: HeadAblation, zs: ReadoutStepper, sets: Sequence[Sequence[Head]], *, n_boot: int = 2000, seed: int = 0
) -> pd.DataFrame:
    """The four effects of each head set, with CIs (one row per set, named by ``fmt_heads``).

    Cost: per set, ``2 x S`` one-token steps per context for the interchange and as many for the condition-matched
    ablation (the draw's cached steppers, no new forward), and ``abl.n_resample`` zero-shot runs."""
    inter, ablated = abl.with_mode("interchange"), abl.with_mode(ROLE_ABLATION)
    ti = inter.table(inter.scores(sets), n_boot, seed)
    ta = ablated.table(ablated.scores(sets), n_boot, seed)
    out = pd.DataFrame({"heads": ti.heads})
    for name, src, col in (
        ("interchange", ti, "effect"),
        ("ablated_correct", ta, "d_p_correct"),
        ("ablated_flipped", ta, "d_p_flipped"),
    ):
        for suffix in ("", "_ci_low", "_ci_high"):
            out[name + suffix] = src[col + suffix].to_numpy()
    return out.merge(zero_shot_effect(zs, sets, abl.n_resample, n_boot, seed), on="heads")


def _excludes_zero(lo: float, hi: float) -> bool:
    """A CI clear of 0 by more than ``TOL`` (float64 round-off of an exactly-zero effect is not an effect)."""
    return bool(lo > TOL or hi < -TOL)


def _material(lo: float, hi: float, margin: float) -> bool:
    """A CI clear of 0 that is not inside +-margin: an effect, and not a negligible one."""
    return _excludes_zero(lo, hi) and not (-margin <= lo and hi <= margin)


def head_role(r: dict[str, Any] | pd.Series, margin: float) -> tuple[str, str]:
    """(role, reason) from one row of ``label_specific_effects`` and the zero-shot margin (module docstring)."""
    if not margin > 0:
        raise ValueError(f"the zero-shot margin must be > 0, got {margin!r}")
    z_lo, z_hi = r["d_p_zero_shot_ci_low"], r["d_p_zero_shot_ci_high"]
    zs = f"zero-shot ΔP {r['d_p_zero_shot']:+.3f} [{z_lo:+.3f}, {z_hi:+.3f}]"
    inside, beyond = bool(-margin <= z_lo and z_hi <= margin), _material(z_lo, z_hi, margin)
    label = r["interchange_ci_low"] > TOL
    inter = f"interchange {r['interchange']:+.2f} [{r['interchange_ci_low']:+.2f}, {r['interchange_ci_high']:+.2f}]"
    if label and inside:
        return "label", f"{inter} above 0; {zs} inside ±{margin:.3f}"
    if label and beyond:
        return "label+prior", f"{inter} above 0, but {zs} reaches past ±{margin:.3f}"
    if label:
        return "unresolved", f"{inter} above 0; {zs} neither inside ±{margin:.3f} nor clear of 0"
    if beyond:
        return "prior", f"{inter} not above 0; {zs} reaches past ±{margin:.3f}"
    moved = [
        c for c in ("correct", "flipped") if _material(r[f"ablated_{c}_ci_low"], r[f"ablated_{c}_ci_high"], margin)
    ]
    if moved:
        return (
            "class",
            f"{inter} not above 0; condition-matched ablation moves P(true) past ±{margin:.3f} in {' and '.join(moved)} contexts",
        )
    return "generic", f"{inter} not above 0; no zero-shot or in-context ablation effect past ±{margin:.3f}"


def assign_roles(effects: pd.DataFrame, gap_ci_low: float) -> pd.DataFrame:
    """``effects`` with ``role``, ``role_reason`` and the ``zero_shot_margin`` used (``ZERO_SHOT_MARGIN`` x the
    cell's gap lower bound, which must be > 0: a cell without an in-context effect has no roles to assign)."""
    if not gap_ci_low > 0:
        raise ValueError(f"roles need an in-context gap whose CI lies above 0 (lower bound {gap_ci_low!r})")
    margin = ZERO_SHOT_MARGIN * gap_ci_low
    roles = [head_role(r, margin) for _, r in effects.iterrows()]
    return effects.assign(role=[r for r, _ in roles], role_reason=[why for _, why in roles], zero_shot_margin=margin)
