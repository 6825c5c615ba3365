"""Label attention, PM and induction scores against hand computations on the tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mechicl.analysis.inside import attention as A
from mechicl.analysis.inside.frames import top_heads
from mechicl.data.batches import repeated_random_tokens
from mechicl.data.prompts import BOS, INPUT, LABEL, TEMPLATE
from mechicl.data.task import Template
from tests import helpers

K_MIN = 2


@pytest.fixture(scope="module")
def task3():
    return helpers.toy_task(n_classes=3)  # 1-3 word inputs: contexts of different lengths (padding)


@pytest.fixture(scope="module")
def batches(tiny, task3):
    bd = helpers.batch(tiny, task3, "default", n_contexts=3, n_examples=6, seed=1)
    bf = helpers.batch(tiny, task3, "flipped", n_contexts=3, n_examples=6, seed=1)
    assert torch.equal(bd.example_ids, bf.example_ids) and len(set(bd.lengths.tolist())) > 1
    return bd, bf


def _hand_patterns(loaded, b, row):
    """Every layer's pattern on one unpadded context, from run_with_cache: [layer, head, q, k]."""
    n = int(b.lengths[row])
    with torch.no_grad():
        _, cache = loaded.model.run_with_cache(
            b.tokens[row : row + 1, :n], names_filter=lambda s: s.endswith("hook_pattern")
        )
    return torch.stack([cache[f"blocks.{l}.attn.hook_pattern"][0] for l in range(loaded.model.cfg.n_layers)])


def _hand_tables(loaded, b, n_classes):
    """Per (layer, head): mean over queries i >= K_MIN of the mass to each category and PM, by explicit loops."""
    L, H = loaded.model.cfg.n_layers, loaded.model.cfg.n_heads
    mass = {c: np.zeros((L, H)) for c in A.CATEGORIES}
    pm = np.zeros((L, H))
    n_q = 0
    for row in range(b.n_contexts):
        pat = _hand_patterns(loaded, b, row).numpy()
        roles = b.roles[row].tolist()
        for i in range(K_MIN, b.n_examples):
            q = int(b.readout_pos[row, i])
            yq = int(b.true_labels[row, i])
            n_q += 1
            for j in range(i):
                p = int(b.label_pos[row, j])
                shown = int(b.shown_labels[row, j])
                mass["label_same" if shown == yq else "label_other"] += pat[:, :, q, p]
                same_demo = int(b.true_labels[row, j]) == yq
                pm += pat[:, :, q, p] if same_demo else -pat[:, :, q, p] / (n_classes - 1)
            for j in range(i + 1):
                s, e = b.input_spans[row, j].tolist()
                mass["input_query" if j == i else "input_earlier"] += pat[:, :, q, s:e].sum(-1)
            mass["first"] += pat[:, :, q, 0]
            for t in range(1, q + 1):
                if roles[t] == TEMPLATE:
                    mass["template"] += pat[:, :, q, t]
    return {c: v / n_q for c, v in mass.items()}, pm / n_q


def test_key_categories_partition_the_visible_tokens(batches):
    for b in batches:
        cats = A.key_categories(b)  # [b, ex, cat, W]
        visible = torch.arange(b.tokens.shape[1])[None, None] <= b.readout_pos[..., None]
        assert torch.equal(cats.sum(2), visible.long()), "every visible key in exactly one category"
        first, lab = cats[:, :, 0], cats[:, :, 1] | cats[:, :, 2]
        assert (b.roles[:, None].expand_as(lab)[lab] == LABEL).all()
        assert (b.roles[:, None].expand_as(first)[first] == BOS).all()
        inputs = cats[:, :, 3] | cats[:, :, 4]
        assert (b.roles[:, None].expand_as(inputs)[inputs] == INPUT).all()
        # query i sees exactly i label tokens
        assert torch.equal(lab.sum(-1), torch.arange(b.n_examples).expand(b.n_contexts, -1))


def test_label_attention_and_pm_match_hand_computation(tiny, task3, batches):
    la = A.label_attention(tiny.model, list(batches), task3.n_classes, k_min=K_MIN, batch_size=2, progress=False)
    for b in batches:
        mass, pm = _hand_tables(tiny, b, task3.n_classes)
        got = la.mass[la.mass.condition == b.condition]
        for c in A.CATEGORIES:
            g = got[got.category == c].sort_values(["layer", "head"])["mean"].to_numpy().reshape(mass[c].shape)
            np.testing.assert_allclose(g, mass[c], atol=1e-5, err_msg=f"{b.condition}/{c}")
        gp = la.pm[la.pm.condition == b.condition].sort_values(["layer", "head"]).pm.to_numpy().reshape(pm.shape)
        np.testing.assert_allclose(gp, pm, atol=1e-5)
    total = la.mass.groupby(["condition", "layer", "head"])["mean"].sum()
    np.testing.assert_allclose(total.to_numpy(), 1.0, atol=1e-5)
    # under correct labels the shown word is the demonstration's class: both PM variants agree
    d = la.pm[la.pm.condition == "default"]
    np.testing.assert_allclose(d.pm, d.pm_word, atol=1e-7)


def test_by_distance_counts_and_means(tiny, task3, batches):
    bd = batches[0]
    la = A.label_attention(tiny.model, [bd], task3.n_classes, k_min=K_MIN, progress=False)
    d = la.by_distance
    one = d[(d.layer == 1) & (d["head"] == 2)]
    # every (query i >= K_MIN, earlier label j) pair is counted once
    k = bd.n_examples
    assert one.n.sum() == bd.n_contexts * sum(range(K_MIN, k))
    # hand mean at distance 1, same class
    vals = []
    for row in range(bd.n_contexts):
        pat = _hand_patterns(tiny, bd, row)[1, 2]
        for i in range(K_MIN, k):
            j = i - 1
            if int(bd.true_labels[row, j]) == int(bd.true_labels[row, i]):
                vals.append(float(pat[bd.readout_pos[row, i], bd.label_pos[row, j]]))
    got = one[(one.distance == 1) & one.same_class]
    assert int(got.n.iloc[0]) == len(vals)
    assert got["mean"].iloc[0] == pytest.approx(np.mean(vals), abs=1e-6)


def test_padding_does_not_change_patterns(tiny, task3):
    """Contexts of different lengths in one padded batch give the same rows as unpadded runs."""
    b = helpers.batch(
        tiny, task3, n_contexts=4, n_examples=5, seed=3, template=Template("Input: {input}\nLabel: {label}", "\n")
    )
    assert len(set(b.lengths.tolist())) > 1
    pats = A.readout_patterns(tiny.model, b, batch_size=4, progress=False)
    for row in range(b.n_contexts):
        ref = _hand_patterns(tiny, b, row)  # [L, H, q, k]
        n = int(b.lengths[row])
        exp = ref[:, :, b.readout_pos[row]].permute(2, 0, 1, 3)  # [ex, L, H, k]
        torch.testing.assert_close(pats[row, :, :, :, :n], exp, atol=1e-5, rtol=1e-4)
        assert pats[row, :, :, :, n:].abs().sum() < 1e-6  # padding keys get no attention


def test_induction_score_matches_hand_computation(tiny):
    tokens, off = repeated_random_tokens(
        tiny.tokenizer, tiny.model.cfg.d_vocab, tiny.prepend_bos, n_seqs=3, seq_len=12, seed=5
    )
    assert off == 1 and torch.equal(tokens[:, 1:13], tokens[:, 13:25])
    assert not set(tokens[:, 1:].flatten().tolist()) & set(tiny.tokenizer.all_special_ids)
    got = A.induction_scores(tiny.model, tokens, off)
    with torch.no_grad():
        _, cache = tiny.model.run_with_cache(tokens, names_filter=lambda s: s.endswith("hook_pattern"))
    for l in range(2):
        pat = cache[f"blocks.{l}.attn.hook_pattern"]  # [b, h, q, k]
        hand = torch.stack([pat[:, :, off + 12 + t, off + t + 1] for t in range(12)], -1).mean((0, 2))
        g = got[got.layer == l].sort_values("head").induction.to_numpy()
        np.testing.assert_allclose(g, hand.numpy(), atol=1e-6)


def test_top_heads_orders_and_names():
    import pandas as pd

    df = pd.DataFrame({"layer": [0, 0, 1, 1], "head": [0, 1, 0, 1], "s": [0.1, 0.4, -0.2, 0.3]})
    top = top_heads(df, "s", 2)
    assert list(top.name) == ["L0H1", "L1H1"]
    assert list(top_heads(df, "s", 1, ascending=True).name) == ["L1H0"]


def test_k_min_is_validated(tiny, batches):
    with pytest.raises(ValueError, match="k_min"):
        A.label_attention(tiny.model, [batches[0]], 3, k_min=0, progress=False)
