"""The commands' figures in viz/: each draws the rows it is given, selected and labelled as its caption says.

The plot call is captured (``line_plot`` replaced), and the frame it received is compared with the rows picked
from the input by a plain loop."""

from __future__ import annotations

import numpy as np
import pandas as pd

from mechicl.viz import attention, lens


def _capture(monkeypatch, module):
    calls = []
    monkeypatch.setattr(module, "line_plot", lambda df, x, y, path, **kw: calls.append((df, x, y, path, kw)) or path)
    return calls


def test_lens_curves_draw_true_and_shown_labels_and_mark_the_critical_depth(tmp_path, monkeypatch):
    rows = [
        {"depth": d, "metric": f"{m}_{w}", "condition": c, "mean": d / 10, "ci_low": 0.0, "ci_high": 1.0}
        for d in range(3)
        for m in ("accuracy", "log_likelihood")
        for w in ("true", "shown")
        for c in ("default", "flipped")
    ]
    calls = _capture(monkeypatch, lens)
    lens.lens_curves(pd.DataFrame(rows), 2, tmp_path, "m / t")
    assert [c[3].name for c in calls] == ["lens_accuracy.png", "lens_log_likelihood.png"]
    for (df, x, y, _, kw), metric in zip(calls, ("accuracy", "log_likelihood")):
        want = {
            f"{r['condition']} vs {r['metric'].split('_')[-1]} label"
            for r in rows
            if r["metric"].startswith(metric + "_") and not (r["condition"] == "default" and "shown" in r["metric"])
        }
        assert set(df.series) == want == {"default vs true label", "flipped vs true label", "flipped vs shown label"}
        assert (x, y, kw["vline"], kw["band"]) == ("depth", "mean", 2, ("ci_low", "ci_high")) and len(df) == 9


def test_distance_curve_draws_the_best_head_averaged_per_distance(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    rows = [
        {"layer": l, "head": h, "condition": c, "same_word": s, "distance": d, "mean": float(rng.random())}
        for l in range(2)
        for h in range(2)
        for c in ("default", "flipped")
        for s in (True, False)
        for d in (1, 2, 3)
        for _ in range(2)  # two rows per cell: the curve averages them
    ]
    calls = _capture(monkeypatch, attention)
    attention.distance_curve(tmp_path, pd.DataFrame(rows), pd.Series({"layer": 1, "head": 0, "name": "L1H0"}), "t")
    [(df, x, y, path, kw)] = calls
    assert (x, y, path.name, kw["title"].split(":")[0]) == ("distance", "mean", "label_attention_distance.png", "L1H0")
    for r in df.itertuples():
        cond, word = r.series.split(", ", 1)
        picked = [
            q["mean"]
            for q in rows
            if (q["layer"], q["head"], q["condition"], q["distance"]) == (1, 0, cond, r.distance)
            and q["same_word"] == (word == "word = query's class")
        ]
        assert len(picked) == 2 and np.isclose(r.mean, sum(picked) / 2)
    assert len(df) == 2 * 2 * 3
