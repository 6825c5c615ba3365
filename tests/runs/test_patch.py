"""`mechicl patch` heatmaps draw the table's `effect` (not `value`), and position maps mark the query slot."""

from __future__ import annotations

import numpy as np
import torch

from mechicl.analysis.patching.exact import PatchResult
from mechicl.runs import patch
from mechicl.runs.folder import RunFolder


def _result(kind: str, direction: str, axes: tuple[str, str], roles: tuple[str, ...] = ()) -> PatchResult:
    values = torch.tensor([[0.013, 0.9, 1.0], [0.5, 1.2, 0.99]])
    return PatchResult(
        kind,
        direction,
        axes,
        values,
        values[..., None].repeat(1, 1, 2),
        torch.zeros(2),
        torch.zeros(2),
        pos_roles=roles,
    )


def test_heatmaps_show_effect_and_mark_the_query(tmp_path, monkeypatch):
    drawn = {}
    draw = lambda v, path, title, **kw: drawn.__setitem__(path.name, (v, title, kw))  # noqa: E731
    monkeypatch.setattr("mechicl.viz.patching.heatmap", draw)  # the one drawing call, under runs.patch
    results = [
        _result("head_out", "noise", ("layer", "head")),
        _result("resid", "denoise", ("layer", "pos"), ("bos",) * 3),
    ]
    patch.write_patch_results(RunFolder(tmp_path), results, "m on t", query_pos=[2, 2])
    v, title, kw = drawn["head_out_noise.png"]
    table = results[0].table()
    np.testing.assert_allclose(v.reshape(-1), table.effect.to_numpy(), rtol=1e-6)  # -0.987 in the table is -0.987 here
    assert np.isclose(v[0, 0], 0.013 - 1) and kw["center"] == 0.0 and kw["label"] == "effect" and "value - 1" in title
    assert kw["mark_cols"] == ()  # head maps have no positions
    v, title, kw = drawn["resid_denoise.png"]
    np.testing.assert_allclose(v, results[1].values.numpy()) and kw["mark_cols"] == [2]
    assert kw["mark_label"] == "query readout slot"
