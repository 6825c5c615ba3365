"""Findings: resample ablation at every slot against hooked forwards, matched controls, the staged cell."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest

from mechicl.analysis.heads.finder import NO_EFFECT, FindingsConfig, _screen, find_label_heads
from mechicl.analysis.heads.validation import matched_controls
from mechicl.data.batches import held_out_batches, stage_draws
from mechicl.data.tasks import load_task
from mechicl.errors import ConfigError
from mechicl.models.loading import load_model
from tests import helpers


def test_matched_controls_same_layer_first_then_neighbours_nearest_in_norm():
    norms = np.array([[1.0, 2.0, 3.0], [1.0, 5.0, 2.1], [9.0, 2.2, 4.0]])
    # same layer holds 2 other heads; asking for 2 stays in layer 1, nearest in norm to 2.1 first
    assert matched_controls((1, 2), norms, set(), "layer", 2) == [
        (1, 0),
        (1, 1),
    ]  # |log 1 - log 2.1| < |log 5 - log 2.1|
    got = matched_controls((1, 2), norms, set(), "layer", 4)  # widened to layers 0-2
    assert (1, 2) not in got and len(got) == 4 and all(abs(l - 1) <= 1 for l, _ in got)
    assert got[0] in {(0, 1), (2, 1)}  # norms 2.0 / 2.2: nearest to 2.1
    assert (1, 1) not in matched_controls((1, 2), norms, {(1, 1)}, "layer", 2)
    assert set(matched_controls((0, 0), norms, set(), "norm", 2)) == {(1, 0), (0, 1)}


def test_config_errors_name_the_problem():
    with pytest.raises(ConfigError, match="k_min"):
        FindingsConfig(k=4, k_min=5)
    with pytest.raises(ConfigError, match="control"):
        FindingsConfig(control="random")


CFG = FindingsConfig(
    k=10, k_min=4, n_screen=6, n_confirm=6, n_validate=12, n_candidates=4, n_top=2, n_control=3, n_boot=500, n_perm=500
)


@pytest.fixture(scope="module")
def organism_cell():
    loaded = load_model("organism-strong")
    task = load_task("organism")
    draws = stage_draws(task, CFG.sizes, CFG.k + 1, seed=0)
    return find_label_heads(
        loaded.model,
        held_out_batches(task, loaded.tokenizer, draws, n_ctx=loaded.n_ctx, prepend_bos=loaded.prepend_bos),
        CFG,
        progress=False,
    ), draws


def test_cell_on_the_strong_organism_ranks_validates_and_controls(organism_cell):
    r, draws = organism_cell
    assert r.has_effect and r.baseline["gap_ci_low"] > 0
    assert len(r.screen) == 8 and list(r.screen.screen_rank) == list(range(1, 9))
    assert len(r.confirm) == CFG.n_candidates  # the ranking is exercised: fewer candidates than heads
    top = list(zip(r.confirm.layer[:2], r.confirm["head"][:2]))
    assert list(zip(r.validate.layer, r.validate["head"])) == top  # validated = confirmation's top, in order
    assert (r.validate.above_control == ((r.validate.diff_ci_low > 0) & (r.validate.effect_ci_low > 0))).all()
    for row in r.validate.itertuples():  # controls exclude the top heads and match the layer when they can
        ctrl = row.controls.split()
        assert len(ctrl) == CFG.n_control and not {f"L{l}H{h}" for l, h in top} & set(ctrl)
    assert (r.validate.effect_ci_low <= r.validate.effect).all() and (
        r.validate.effect <= r.validate.effect_ci_high
    ).all()
    assert r.stage_seeds == draws.seeds and not draws.shared_examples()
    assert list(r.sets.test) == [
        f"{r.validate.heads[0]} {r.validate.heads[1]} vs {r.validate.heads[0]}",
        "top 2 set vs matched sets",
    ]
    assert (r.sets.above_control == (r.sets.diff_ci_low > 0)).all()


def test_stages_that_share_rows_are_refused(tiny):
    task = helpers.toy_task(2, n=60)
    draws = stage_draws(task, CFG.sizes, 5, seed=0)
    bad = type(draws)({**draws.ids, "validate": draws.ids["screen"]}, draws.seeds, draws.pools)
    batches = held_out_batches(task, tiny.tokenizer, bad, n_ctx=tiny.n_ctx, prepend_bos=tiny.prepend_bos)
    with pytest.raises(ValueError, match="share task rows"):
        find_label_heads(
            tiny.model, batches, FindingsConfig(k=4, k_min=1, n_screen=6, n_confirm=6, n_validate=12), progress=False
        )


def test_a_cell_without_a_label_effect_ranks_no_head(tiny):
    """The random tiny model ignores its labels: the verdict says so and no table is filled."""
    task = helpers.toy_task(2, n=120)
    cfg = FindingsConfig(k=6, k_min=2, n_screen=6, n_confirm=6, n_validate=24, n_boot=500)
    draws = stage_draws(task, cfg.sizes, cfg.k + 1, seed=0)
    r = find_label_heads(
        tiny.model,
        held_out_batches(task, tiny.tokenizer, draws, n_ctx=tiny.n_ctx, prepend_bos=tiny.prepend_bos),
        cfg,
        progress=False,
    )
    assert r.baseline["gap_ci_low"] <= 0 and r.verdict == NO_EFFECT and not r.has_effect
    assert r.screen.empty and r.validate.empty


class _FakeAblation:
    """Per-head closed gaps fixed in advance; the screening draw's own gap is not positive."""

    def __init__(self, closed: np.ndarray, gap: np.ndarray) -> None:
        self.closed, self.gap = closed, gap  # closed [L*H, b], gap [b]

    def attribution(self) -> np.ndarray:
        return (self.closed * 0.5).T.reshape(len(self.gap), 2, 3)

    def scores(self, sets, progress=False):
        assert [s[0] for s in sets] == [(l, h) for l in range(2) for h in range(3)]
        return SimpleNamespace(closed=self.closed)


@pytest.mark.parametrize("screen", ["exact", "attribution"])
def test_screen_ranks_heads_when_the_screening_gap_is_not_positive(screen):
    closed = np.array([[0.1, 0.0], [-0.2, 0.0], [0.5, 0.1], [0.0, 0.0], [0.3, 0.4], [0.05, 0.0]])
    df = _screen(_FakeAblation(closed, np.array([0.02, -0.04])), replace(CFG, screen=screen), progress=False)
    assert list(zip(df.layer, df["head"])) == [(1, 1), (0, 2), (0, 0), (1, 2), (1, 0), (0, 1)]  # by mean closed
    assert list(df.screen_rank) == list(range(1, 7)) and df.effect_est.isna().all()
    assert screen == "attribution" or df.effect.isna().all()


def test_a_model_with_too_few_heads_is_refused_before_compute():
    """n_top validated heads each need n_control matched controls among the other, unvalidated heads (issue 30:
    `report --quick` on a 2-heads-per-layer model failed after all its compute)."""
    from mechicl.analysis.heads.finder import FindingsConfig, check_head_pool
    from mechicl.errors import ConfigError

    cfg = FindingsConfig(n_top=3, n_control=5)
    check_head_pool(cfg, 2, 4)  # 8 heads: 3 + 5 fits exactly
    with pytest.raises(ConfigError, match=r"the model has 4 heads \(2 layers x 2\).*n_top \+ n_control <= 4"):
        check_head_pool(cfg, 2, 2)


@pytest.mark.parametrize("field", ["n_boot", "n_perm"])
def test_degenerate_draw_counts_fail_when_the_cell_is_configured(field):
    """n_boot = 1 or n_perm = 0 is refused when the config is made, not when compute reaches the statistics."""
    from mechicl.analysis.heads.finder import FindingsConfig
    from mechicl.errors import ConfigError

    for bad in (0, 1, 19):
        with pytest.raises(ConfigError, match=f"{field} = {bad}"):
            FindingsConfig(**{field: bad})


def test_preregistered_heads_are_validated_as_given_on_rows_never_used_before():
    """Pre-registration (issue 27): the named heads are validated without screening or confirmation, on a
    validation draw whose rows no earlier seed's three-stage draws used."""
    from mechicl.data.batches import used_rows

    loaded, task = load_model("organism-strong"), load_task("organism")
    cfg = replace(CFG, heads="L0H0,L1H1", fresh_after="0 1", seed=5)
    assert cfg.sizes == {"validate": CFG.n_validate} and cfg.preregistered == ((0, 0), (1, 1))
    old = used_rows(task, cfg.discovery_sizes, cfg.k + 1, (0, 1), load=lambda s: task)
    draws = stage_draws(task, cfg.sizes, cfg.k + 1, seed=cfg.seed, exclude=old)
    assert old and not old & {int(r) for r in draws.ids["validate"].ravel()}
    kw = dict(n_ctx=loaded.n_ctx, prepend_bos=loaded.prepend_bos)
    r = find_label_heads(loaded.model, held_out_batches(task, loaded.tokenizer, draws, **kw), cfg, progress=False)
    assert list(r.validate.heads) == ["L0H0", "L1H1"] and r.screen.empty and r.confirm.empty
    assert "pre-registered" in r.verdict and set(r.validate.role) <= {
        "label",
        "label+prior",
        "prior",
        "class",
        "generic",
        "unresolved",
    }
    with pytest.raises(ConfigError, match="not in this model"):
        find_label_heads(
            loaded.model, held_out_batches(task, loaded.tokenizer, draws, **kw), replace(cfg, heads="L7H0")
        )
    with pytest.raises(ConfigError, match="fresh_after"):
        replace(CFG, fresh_after="zero")
    with pytest.raises(ConfigError, match="twice"):
        replace(CFG, heads="L1H1 L1H1")


def test_the_validated_heads_carry_their_roles(organism_cell):
    r, _ = organism_cell
    for col in ("interchange", "ablated_correct", "ablated_flipped", "d_p_zero_shot", "role", "role_reason"):
        assert col in r.validate and r.validate[col].notna().all()
    top_set = r.sets[r.sets.test.str.startswith("top ")]
    assert top_set.role.notna().all() and (r.validate.controls_other_layer >= 0).all()
    assert r.baseline["design_effect"] >= 1.0
