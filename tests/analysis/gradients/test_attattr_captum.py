"""AttAttr against Captum's integrated gradients (an independent library, issue 27 item 7): Captum's
``IntegratedGradients`` with its midpoint Riemann rule over one layer's attention pattern, the metric computed from
the model's full logits, equals ``attattr`` within 1e-5 (absolute, float32) on tiny and on the planted organisms."""

from __future__ import annotations

import pytest
import torch

captum_attr = pytest.importorskip("captum.attr", reason="captum is in the test extras: pip install -e '.[test]'")

from mechicl.analysis.gradients.attattr import attattr, default_targets, uniform_pattern  # noqa: E402
from mechicl.data.pairs import pair_for  # noqa: E402
from mechicl.data.tasks import load_task  # noqa: E402
from mechicl.models.loading import load_model  # noqa: E402

TOL = 1e-5


def _captum_attattr(model, batch, answer, foil, layer, steps, baseline):
    """Captum IG of the answer - foil logit difference (full logits at the query slot) w.r.t. layer's pattern."""
    name = f"blocks.{layer}.attn.hook_pattern"
    W = int(batch.readout_pos[:, -1].max()) + 1
    tokens = batch.tokens[:, :W]
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n == name)
    A = cache[name].detach()
    ids, q = batch.label_token_ids, batch.readout_pos[:, -1]

    def forward(pattern, toks, q, a_id, f_id):
        logits = model.run_with_hooks(toks, fwd_hooks=[(name, lambda x, hook: pattern)])
        rows = torch.arange(toks.shape[0])
        return logits[rows, q, a_id] - logits[rows, q, f_id]

    base = torch.zeros_like(A) if baseline == "zero" else uniform_pattern(tuple(A.shape)).clone()
    ig = captum_attr.IntegratedGradients(forward)
    return ig.attribute(
        A,
        baselines=base,
        additional_forward_args=(tokens, q, ids[answer], ids[foil]),
        n_steps=steps,
        method="riemann_middle",
    )


@pytest.mark.parametrize(
    "model, task, baseline",
    [
        ("tiny", "toy", "zero"),
        ("tiny", "toy", "uniform"),
        ("constructed", "organism", "zero"),
        ("organism-strong", "organism", "zero"),
    ],
)
def test_attattr_equals_captum_integrated_gradients(model, task, baseline):
    loaded = load_model(model)
    b = pair_for(loaded, load_task(task), 4, 6 if task == "toy" else 9).clean
    answer, foil = default_targets(b)
    L = int(loaded.model.cfg.n_layers)
    for layer in range(L):
        (r,) = attattr(loaded.model, b, answer, foil, layers=[layer], steps=8, baseline=baseline)
        ref = _captum_attattr(loaded.model, b, answer, foil, layer, 8, baseline)
        assert r.attr.shape == ref.shape
        assert torch.allclose(r.attr, ref.to(r.attr.dtype), atol=TOL), (layer, (r.attr - ref).abs().max())
        assert ref.abs().max() > 1e-3 or layer < L - 1  # not vacuous: the readout layer attributes something
