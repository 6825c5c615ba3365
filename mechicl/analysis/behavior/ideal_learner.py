"""An ideal Bayesian learner with the model's *own* prior, to measure how fast ICL overcomes that prior.

Binary tasks. For the query at readout slot ``k`` of context ``i`` (``k`` demonstrations seen), the learner's
log-odds that the query shows its *true* (default-map) label is

    eta[i, k] = z[i, k] + beta_c * S[i, k],     S[i, k] = sum_{j < k} a[i, j],   a = +1 if demonstration j
                                                 shows its true label, -1 if it shows the other one,

where ``z[i, k]`` is the model's zero-shot log-odds of that query's true label (its pre-training prior, the
query alone with no demonstrations) and ``beta_c`` (one scalar, or one per query class ``c``) is the
evidence one demonstration carries. This is Bayes' rule for a learner whose prior odds that the query
follows the default map are ``exp(z)`` and who reads each demonstration as an independent observation with
likelihood ratio ``exp(+-beta)`` between "this context follows the default map" and "it follows the flipped
map". The learner's probability of the label the prompt *shows* is ``sigmoid(+eta)`` if the query shows
its true label and ``sigmoid(-eta)`` otherwise.

``beta`` is fitted on DEFAULT-label contexts only, by maximum likelihood of the model's own predictions
(the model's probability of the shown label is a soft target; the log-likelihood is concave in beta, so
the maximum is unique), over k = 1..K (k = 0 carries no information on beta). The fitted learner then
*predicts* every other condition (flipped labels, switches) from the same prior and evidence strength;
``learner_curves`` sets the model's curve beside that prediction with percentile-bootstrap CIs over
contexts (each resample refits beta, so the CIs include the fit's uncertainty).

``rescaled=True`` also fits a prior weight ``w`` (``eta = w z + beta S``, both on the default contexts):
the zero-shot prompt is not the in-context format, and a model can be less (or more) sure of a query
inside a context than alone; ``w`` absorbs that without touching how evidence adds up.
Cost: numpy only, O(n_boot x contexts x k); no model forwards (the caller scores the zero-shot batch).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from scipy import optimize
from scipy.special import expit, log_expit
from torch import Tensor

from mechicl.analysis.engine.readout import label_logits
from mechicl.analysis.stats import bootstrap_indices, percentile_interval
from mechicl.data.prompts import PromptBatch

BETA_MAX = 20.0  # nats per demonstration; far above anything a model shows (the fit reports hitting it)


def evidence_sums(signs: Float[np.ndarray, "n e"]) -> Float[np.ndarray, "n e"]:
    """S[i, k] = sum of the agreement signs of the demonstrations *before* slot k (S[:, 0] = 0)."""
    s = np.asarray(signs, dtype=float)
    return np.concatenate([np.zeros((len(s), 1)), np.cumsum(s[:, :-1], axis=1)], axis=1)


def log_odds(
    z: Float[np.ndarray, "n e"], s_sum: Float[np.ndarray, "n e"], beta: Float[np.ndarray, "n e"]
) -> np.ndarray:
    """The learner's log-odds of each query's true label (``beta`` broadcast per query)."""
    return np.asarray(z, dtype=float) + np.asarray(beta, dtype=float) * np.asarray(s_sum, dtype=float)


def _neg_loglik(beta: float, z: np.ndarray, s_sum: np.ndarray, p_true: np.ndarray) -> float:
    eta = z + beta * s_sum
    return -float(np.sum(p_true * log_expit(eta) + (1 - p_true) * log_expit(-eta)))


def fit_beta(z: Float[np.ndarray, "m"], s_sum: Float[np.ndarray, "m"], p_true: Float[np.ndarray, "m"]) -> float:
    """Maximum-likelihood evidence strength in [0, BETA_MAX] for soft targets ``p_true`` (flat arrays).

    The objective is concave in beta; a bounded scalar search finds its maximum (0 when the model's
    confidence does not grow with agreeing demonstrations).
    """
    z, s_sum, p_true = (np.asarray(a, dtype=float).ravel() for a in (z, s_sum, p_true))
    if not (len(z) == len(s_sum) == len(p_true)) or len(z) == 0:
        raise ValueError(f"fit_beta needs equal, non-empty arrays; got {len(z)}, {len(s_sum)}, {len(p_true)}")
    if not np.any(s_sum):
        raise ValueError("no demonstrations before any query (all evidence sums are 0): beta is not identified")
    r = optimize.minimize_scalar(
        _neg_loglik, bounds=(0.0, BETA_MAX), args=(z, s_sum, p_true), method="bounded", options={"xatol": 1e-7}
    )
    return float(r.x)


def _neg_loglik2(params: np.ndarray, z: np.ndarray, s_sum: np.ndarray, p_true: np.ndarray) -> tuple[float, np.ndarray]:
    w, beta = params
    eta = w * z + beta * s_sum
    resid = p_true - expit(eta)  # d loglik / d eta
    return _neg_loglik(beta, w * z, s_sum, p_true), -np.array([np.sum(resid * z), np.sum(resid * s_sum)])


def fit_weight_and_beta(
    z: Float[np.ndarray, "m"], s_sum: Float[np.ndarray, "m"], p_true: Float[np.ndarray, "m"]
) -> tuple[float, float]:
    """Maximum-likelihood (w, beta), w in [0, 5] and beta in [0, BETA_MAX], for ``eta = w z + beta S``.

    Concave in (w, beta) (eta is linear in them): L-BFGS-B with the analytic gradient finds the maximum.
    """
    z, s_sum, p_true = (np.asarray(a, dtype=float).ravel() for a in (z, s_sum, p_true))
    if not np.any(s_sum):
        raise ValueError("no demonstrations before any query (all evidence sums are 0): beta is not identified")
    r = optimize.minimize(
        _neg_loglik2,
        np.array([1.0, 0.1]),
        args=(z, s_sum, p_true),
        jac=True,
        method="L-BFGS-B",
        bounds=[(0.0, 5.0), (0.0, BETA_MAX)],
        options={"ftol": 1e-13, "gtol": 1e-9},
    )
    return float(r.x[0]), float(r.x[1])


@dataclass(frozen=True)
class LearnerInputs:
    """Per-context arrays of one experiment (``e`` = examples per context = k_max + 1), all on the same draws.

    ``z``: the model's zero-shot log-odds of each example's true label; ``true_class``: each example's class;
    ``signs[cond]``: +1 where the example shows its true label, -1 where it shows the other;
    ``model_ll[cond]``: the model's log-probability of the shown label at each readout slot.
    ``default`` names the condition beta is fitted on (its signs must all be +1).
    """

    z: Float[np.ndarray, "n e"]
    true_class: Int[np.ndarray, "n e"]
    signs: dict[str, np.ndarray] = field(repr=False)
    model_ll: dict[str, np.ndarray] = field(repr=False)
    default: str = "default"

    def __post_init__(self) -> None:
        shape = np.shape(self.z)
        if self.default not in self.signs or self.default not in self.model_ll:
            raise ValueError(
                f"the Bayes learner is fitted on condition {self.default!r}; it is not among {sorted(self.signs)}"
            )
        if not np.all(self.signs[self.default] == 1):
            raise ValueError(f"condition {self.default!r} must show every true label to fit the evidence strength")
        for name, arr in [("true_class", self.true_class), *self.signs.items(), *self.model_ll.items()]:
            if np.shape(arr) != shape:
                raise ValueError(f"{name}: shape {np.shape(arr)} differs from z's {shape}")


Params = dict[int, tuple[float, float]]  # query class (-1: all) -> (prior weight w, beta)


def _betas(x: LearnerInputs, rows: np.ndarray, per_class: bool, rescaled: bool = False) -> Params:
    """Fitted (w, beta) per query class (one shared pair under key -1 when not ``per_class``); w = 1 unless
    ``rescaled``."""
    z, cls = x.z[rows, 1:], x.true_class[rows, 1:]
    s_sum = evidence_sums(x.signs[x.default][rows])[:, 1:]
    p = np.exp(x.model_ll[x.default][rows, 1:])
    fit = fit_weight_and_beta if rescaled else (lambda *a: (1.0, fit_beta(*a)))
    if not per_class:
        return {-1: fit(z, s_sum, p)}
    return {int(c): fit(z[cls == c], s_sum[cls == c], p[cls == c]) for c in np.unique(x.true_class)}


def _grid(x: LearnerInputs, params: Params, i: int) -> np.ndarray:
    if -1 in params:
        return np.full(np.shape(x.z), params[-1][i])
    return np.vectorize(lambda c: params.get(int(c), (1.0, 0.0))[i])(x.true_class)


def learner_scores(x: LearnerInputs, params: Params, cond: str) -> tuple[np.ndarray, np.ndarray]:
    """(log-probability, accuracy 1 / 0.5 on a tie / 0) of the shown label under the learner, per (context, k)."""
    signs = x.signs[cond]
    eta = log_odds(_grid(x, params, 0) * x.z, evidence_sums(signs), _grid(x, params, 1)) * signs  # shown label
    return log_expit(eta), np.where(eta == 0, 0.5, (eta > 0).astype(float))


def zero_shot_log_odds(
    model: object, single: PromptBatch, batch_size: int = 32, progress: bool = True
) -> Float[np.ndarray, "n"]:
    """The model's zero-shot log-odds of the true label, one per row of ``single`` (contexts of one example).

    With probabilities normalised over the two label words, the log-odds is the logit difference
    true - other. Cost: one forward of a one-example prompt per row.
    """
    if single.n_examples != 1 or len(single.label_token_ids) != 2:
        raise ValueError(
            f"need one-example contexts of a binary task, got {single.n_examples} examples and "
            f"{len(single.label_token_ids)} labels (build them with data.prompts.build_prompt_batch)"
        )
    logits = label_logits(model, single, batch_size, progress)[:, 0].double()  # [n, 2]
    t = single.true_labels[:, 0]
    return (logits[torch.arange(len(t)), t] - logits[torch.arange(len(t)), 1 - t]).numpy()


def learner_inputs(
    raw: pd.DataFrame, batches: list[PromptBatch], item_ids: Tensor, item_z: np.ndarray, default: str = "default"
) -> LearnerInputs:
    """Assemble ``LearnerInputs`` from ``behavior.score_batches``'s per-context table and the conditions' batches
    (same draws), given the zero-shot log-odds ``item_z`` of the task rows ``item_ids``."""
    lookup = dict(zip(np.asarray(item_ids).tolist(), np.asarray(item_z, dtype=float).tolist()))
    ids = batches[0].example_ids.numpy()
    z = np.vectorize(lookup.__getitem__, otypes=[float])(ids)
    wide = raw[raw.metric == "log_likelihood"].pivot_table(index=["condition", "context"], columns="k", values="value")
    signs, ll = {}, {}
    for b in batches:
        if not np.array_equal(b.example_ids.numpy(), ids):
            raise ValueError(f"condition {b.condition!r} is not on the same context draws as {batches[0].condition!r}")
        signs[b.condition] = np.where(b.shown_labels.numpy() == b.true_labels.numpy(), 1.0, -1.0)
        ll[b.condition] = wide.loc[b.condition].sort_index().to_numpy()
    return LearnerInputs(z, batches[0].true_labels.numpy(), signs, ll, default)


@dataclass(frozen=True)
class LearnerResult:
    """``fit``: (prior weight, beta) per class with bootstrap CIs; ``curves``: tidy (condition, k, metric,
    source, mean, ci_low, ci_high, n) with source in {model, bayes, model - bayes}."""

    fit: pd.DataFrame = field(repr=False)
    curves: pd.DataFrame = field(repr=False)
    n_boot: int = 0
    rescaled: bool = False


def _means(x: LearnerInputs, betas: Params, rows: np.ndarray) -> dict[tuple[str, str, str], np.ndarray]:
    out = {}
    for cond in x.signs:
        ll, acc = learner_scores(x, betas, cond)
        m_ll = x.model_ll[cond]
        m_acc = (m_ll > np.log(0.5)).astype(float) + 0.5 * (m_ll == np.log(0.5))
        for metric, model, bayes in (("log_likelihood", m_ll, ll), ("accuracy", m_acc, acc)):
            out[(cond, metric, "model")] = model[rows].mean(0)
            out[(cond, metric, "bayes")] = bayes[rows].mean(0)
            out[(cond, metric, "model - bayes")] = (model[rows] - bayes[rows]).mean(0)
    return out


def learner_curves(
    x: LearnerInputs,
    per_class: bool = False,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    rescaled: bool = False,
) -> LearnerResult:
    """Fit beta (and w if ``rescaled``) on the default contexts, predict every condition, and bootstrap
    contexts (refitting each time; ``n_boot = 0``: no intervals, NaN).

    Cost: ``n_boot + 1`` fits (each a bounded search over ``contexts x k`` values) per class.
    """
    n = len(x.z)
    all_rows = np.arange(n)
    betas = _betas(x, all_rows, per_class, rescaled)
    point = _means(x, betas, all_rows)
    boot_betas, boot = [], {key: [] for key in point}
    for rows in bootstrap_indices(n, n_boot, seed) if n_boot else ():
        b = _betas(x, rows, per_class, rescaled)
        boot_betas.append(b)
        for key, v in _means(x, b, rows).items():
            boot[key].append(v)
    return LearnerResult(_fit_table(betas, boot_betas, level), _curve_table(point, boot, level, n), n_boot, rescaled)


def _fit_table(betas: Params, boot_betas: list[Params], level: float) -> pd.DataFrame:
    """One row per class: the fitted prior weight and beta with percentile intervals over the refits."""

    def ci(c: int, i: int) -> tuple[float, float]:
        if not boot_betas:
            return np.nan, np.nan
        lo, hi = percentile_interval(np.array([b[c][i] for b in boot_betas]), level)
        return float(lo), float(hi)

    return pd.DataFrame(
        [
            {
                "query_class": "all" if c == -1 else c,
                "prior_weight": w,
                "prior_weight_ci_low": ci(c, 0)[0],
                "prior_weight_ci_high": ci(c, 0)[1],
                "beta": v,
                "ci_low": ci(c, 1)[0],
                "ci_high": ci(c, 1)[1],
                "at_bound": bool(v < 1e-6 or v > BETA_MAX - 1e-3),
            }
            for c, (w, v) in betas.items()
        ]
    )


def _curve_table(point: dict, boot: dict, level: float, n: int) -> pd.DataFrame:
    """Tidy curves: one row per (condition, metric, source, k) with percentile intervals over the refits."""
    rows = []
    for (cond, metric, source), mean in point.items():
        draws = boot[(cond, metric, source)]
        lo, hi = percentile_interval(np.stack(draws, -1), level) if draws else np.full((2, len(mean)), np.nan)
        rows += [
            {
                "condition": cond,
                "k": k,
                "metric": metric,
                "source": source,
                "mean": float(mean[k]),
                "ci_low": float(lo[k]),
                "ci_high": float(hi[k]),
                "n": n,
            }
            for k in range(len(mean))
        ]
    return pd.DataFrame(rows)
