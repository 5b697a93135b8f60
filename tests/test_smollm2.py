"""End-to-end checks on the real bundled model: SmolLM2-135M (30 layers, massive first-token
activations), against float64 numpy over transformers' own hidden states."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import probe
from probe.models import batches, sample_texts
from probe.present.report import MASSIVE_RATIO, MASSIVE_VALUE, massive

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
        assert np.isfinite(x).all()  # so that the absolute tolerances below are finite
        s = run[name]
        assert s.count == x.size and s.min == x.min() and s.max == x.max()
        worst = max(worst, abs(s.mean - x.mean()) / abs(x.mean()), abs(s.std - x.std()) / x.std())
        np.testing.assert_allclose(s.channel.mean, x.mean(0), rtol=1e-6, atol=1e-9 * np.abs(x).max())
        q = [0.001, 0.01, 0.5, 0.99, 0.999]
        ours, ref = s.quantile(q), np.quantile(x, q)
        assert np.all(np.abs(ours - ref) <= GUARANTEE * np.abs(ref)), name
        # a histogram over [min, max] holds every value (the edge buckets' mass is cut to the extremes)
        counts, edges = s.histogram(bins=201, range=(s.min, s.max))
        assert abs(counts.sum() - x.size) <= 1e-9 * x.size, (name, counts.sum(), x.size)
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


def test_massive_activations_are_found_over_every_real_token(real):
    """With skip_first=1 the first token is left out of the kept statistics, yet its ~2.5e4 values
    are reported, apart, as the attention sink, with the ratio to the site's median |x|."""
    model, _, batch, hs = real
    with probe.capture(model, skip_first=1, stats=("moments", "position", "histogram")) as run:
        with torch.no_grad():
            model(**batch)
    mask = batch["attention_mask"].bool()
    keep = mask & ((mask.long().cumsum(-1) - 1) >= 1)
    found = {(m["site"], m["kind"]): m for m in massive(run.result)}
    sinks = 0
    for name, h in zip(run.sites, hs):
        first = float(h[:, 0].abs().max())  # position 0 is real in every (right-padded) row
        med = float(np.median(np.abs(h[keep].double().numpy())))
        ratio = first / med
        if first >= MASSIVE_VALUE and ratio >= MASSIVE_RATIO * (1 + 2 * GUARANTEE):
            m = found[(name, "sink")]
            sinks += 1
            assert m["absmax"] == first and m["position"] == 0
            assert abs(m["ratio"] - ratio) <= 2 * GUARANTEE * ratio
        elif first < MASSIVE_VALUE or ratio <= MASSIVE_RATIO * (1 - 2 * GUARANTEE):
            assert (name, "sink") not in found
    assert sinks >= 10  # SmolLM2's middle layers hold first-token values near 2.5e4
