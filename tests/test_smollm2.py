"""End-to-end checks on the real bundled model: SmolLM2-135M (30 layers, massive first-token
activations), against float64 numpy over transformers' own hidden states."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import probe
from probe.models import batches, sample_texts

GUARANTEE = 2.0**-7 / (2 + 2.0**-7)


@pytest.fixture(scope="module")
def real(smollm):
    model, tok = smollm
    batch = next(batches(tok, sample_texts()[:4], batch_size=4, max_length=48))
    with torch.no_grad():
        hs = model(**batch, output_hidden_states=True).hidden_states
    return model, tok, batch, hs


@pytest.mark.parametrize("skip_first", [0, 1])
def test_parity_real_model(real, skip_first):
    model, _, batch, hs = real
    mask = batch["attention_mask"]
    assert (mask == 0).any()  # the batch is padded
    with probe.capture(model, skip_first=skip_first, strict=True, stats=("moments", "histogram", "cross")) as run:
        with torch.no_grad():
            model(**batch)
    assert len(run.sites) == len(hs) == 31
    keep = mask.bool() & ((mask.cumsum(-1) - 1) >= skip_first)
    worst = 0.0
    for name, h in zip(run.sites, hs):
        x = h[keep].double().numpy()
        s = run[name]
        assert s.count == x.size and s.min == x.min() and s.max == x.max()
        worst = max(worst, abs(s.mean - x.mean()) / abs(x.mean()), abs(s.std - x.std()) / x.std())
        np.testing.assert_allclose(s.channel.mean, x.mean(0), rtol=1e-6, atol=1e-9 * np.abs(x).max())
        q = [0.001, 0.01, 0.5, 0.99, 0.999]
        ours, ref = s.quantile(q), np.quantile(x, q)
        assert np.all(np.abs(ours - ref) <= GUARANTEE * np.abs(ref)), name
    assert worst <= 1e-6
    data = np.stack([h[keep].double().numpy().ravel() for h in hs])
    assert np.max(np.abs(run.cross.r2 - np.corrcoef(data) ** 2)) <= 1e-9


def test_first_token_is_massive_and_skip_first_matters(real):
    model, _, batch, hs = real
    with probe.capture(model, skip_first=1, stats=("moments", "position", "cross")) as run:
        with torch.no_grad():
            model(**batch)
    mid = run["hidden_states.15"]
    assert mid.position.absmax[0] > 10 * np.nanmedian(mid.position.absmax[1:])
    first = 0, len(run.cross.sites) - 2  # embeddings vs the last block before the final norm
    assert run.cross.r2[first] > run.cross.r2_all[first]
