"""The compiled updates (torch.compile of the moments' and per-position steps, the default on
accelerators) give the eager results, and a compiler failure falls back to eager with a warning.

CPU CI has no GPU and need not have a C++ toolchain, so the graphs are compiled with the
``aot_eager`` backend: dynamo traces each step into one graph (``fullgraph=True``: no breaks, no
host reads), AOT autograd lowers it to ATen ops, and those run eagerly. What inductor adds on a
GPU is code generation from that same graph.
"""

from __future__ import annotations

import sys
import warnings

import numpy as np
import pytest
import torch

import probe
from probe.stats import _base
from conftest import batch

STATS = ("moments", "position")


@pytest.fixture
def backend(monkeypatch):
    def use(name):
        monkeypatch.setattr(_base, "COMPILE_BACKEND", name)
        monkeypatch.setattr(_base, "_COMPILED", {})
        monkeypatch.setattr(_base, "_EAGER", set())

    return use


def capture_twice(model, stats=STATS, **kw):
    with probe.capture(model, stats=stats, skip_first=1, strict=True, seed=0, **kw) as run:
        with torch.no_grad():
            for b, t, pad in ((3, 9, "left"), (2, 13, "right"), (4, 5, None)):  # new shapes: dynamic
                ids, mask = batch(b, t, pad)
                if pad is None:
                    model(input_ids=ids)
                else:
                    model(input_ids=ids, attention_mask=mask)
    return run


def assert_same_states(a, b, rtol=1e-9):
    """Every array of the two runs' moments and position states: integers, extremes and counts
    exactly, float64 sums to ``rtol`` (a traced graph may order float64 operations differently)."""
    assert a.sites == b.sites
    for site in a.sites:
        for stat in STATS:
            sa, sb = a[site]._state[stat], b[site]._state[stat]
            assert sa.keys() == sb.keys()
            for k in sa:
                x, y = np.asarray(sa[k]), np.asarray(sb[k])
                if x.dtype.kind in "iub" or k in ("min", "max", "absmax", "n", "tokens"):
                    np.testing.assert_array_equal(y, x, err_msg=f"{site} {stat} {k}")
                else:
                    np.testing.assert_allclose(y, x, rtol=rtol, atol=rtol * np.nanmax(np.abs(x), initial=0),
                                               err_msg=f"{site} {stat} {k}")


def broken(gm, example_inputs):
    raise RuntimeError("no compiler here")


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_compiled_steps_equal_eager(tiny, family, backend):
    model = tiny(family)
    # the compiled path forms deviations in float64 (free inside a fused graph): its eager twin is
    # the same call run eagerly, which is what a failed compile falls back to
    backend(broken)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        twin = capture_twice(model, compile=True)
    backend("aot_eager")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback to eager would warn: the graphs must compile
        compiled = capture_twice(model, compile=True)
    assert _base._COMPILED and not _base._EAGER
    assert_same_states(twin, compiled)
    # and the float32-powers eager path (CPU's default) agrees to the rounding of its powers
    assert_same_states(capture_twice(model, compile=False), compiled, rtol=2e-6)


def test_compile_failure_falls_back_to_eager(tiny, backend):
    backend(broken)
    model = tiny("llama")
    with pytest.warns(UserWarning) as record:
        fallback = capture_twice(model, compile=True)
    messages = sorted(str(w.message) for w in record)
    assert len(messages) == 2, messages  # one warning per compiled step, not one per call
    for message, step in zip(messages, ("moments", "position")):
        assert message.startswith(f"probe: torch.compile of probe.stats.{step}._step failed "
                                  "(RuntimeError: no compiler here); running it eagerly"), message
    assert_same_states(capture_twice(model, compile=False), fallback, rtol=2e-6)


def test_default_compiles_on_accelerators_only(tiny, backend):
    backend("aot_eager")
    with probe.capture(tiny("llama")) as run:
        pass
    stat = next(iter(run._engine.window.values()))["moments"]
    assert stat.compile is None
    assert not stat.compiled(torch.zeros(1, 1))
    assert stat.compiled(torch.zeros(1, 1, device="meta"))


# ---------------------------------------------------------------------------- batched sites
def capture_grouped(model, group_elements, **kw):
    """capture_twice with consecutive sites batched as on an accelerator (on CPU, for the test)."""
    original = probe.capture

    def grouped(*a, **k):
        c = original(*a, **k)
        c._engine.group_elements = group_elements
        return c

    probe.capture = grouped
    try:
        return capture_twice(model, **kw)
    finally:
        probe.capture = original


def all_stats(run):
    return {(site, kind): {k: np.asarray(v) for k, v in run[site]._state[kind].items()}
            for site in run.sites for kind in run[site]._state}


@pytest.mark.parametrize("group_elements, chunk", [(10**9, None), (2 * 13 * 2 * 32, None), (10**9, 96)])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_batched_sites_equal_site_by_site(tiny, family, group_elements, chunk, monkeypatch):
    """Sites gathered into one batch (all of them, pairs, or batches cut into token chunks) give
    what each site gives alone: counts, extremes, histograms and samples exactly, sums to rounding."""
    model = tiny(family)
    if chunk:
        monkeypatch.setattr(sys.modules["probe.capture.engine"], "CHUNK_ELEMENTS", chunk)
    every = ("moments", "position", "histogram", "sample", "cross")
    alone = capture_twice(model, stats=every)
    sizes = []
    original = probe.stats.Moments.update_group.__func__

    def recorded(cls, stats, x, tokens):
        sizes.append(len(stats))
        original(cls, stats, x, tokens)

    monkeypatch.setattr(probe.stats.Moments, "update_group", classmethod(recorded))
    grouped = capture_grouped(model, group_elements, stats=every)
    assert max(sizes) == (len(alone.sites) if group_elements > 10**6 else 2), sizes  # batches did form
    a, b = all_stats(alone), all_stats(grouped)
    assert a.keys() == b.keys()
    for key in a:
        for field, x in a[key].items():
            y = b[key][field]
            if x.dtype.kind in "iub" or key[1] in ("histogram", "sample") or field in ("min", "max", "absmax", "n"):
                np.testing.assert_array_equal(y, x, err_msg=f"{key} {field}")
            else:
                np.testing.assert_allclose(y, x, rtol=1e-6, atol=1e-6 * np.nanmax(np.abs(x), initial=0),
                                           err_msg=f"{key} {field}")
    np.testing.assert_allclose(grouped.cross.r2, alone.cross.r2, rtol=1e-12)


def test_batched_failure_disables_the_batch_with_one_warning(tiny):
    model = tiny("llama")
    ids, mask = batch(3, 9, "left")
    with probe.capture(model, stats=("moments",)) as c:
        c._engine.group_elements = 10**9
        c._engine.window["hidden_states.1"]["moments"]._init_like = lambda *a: 1 / 0
        expected = (r"sites \['hidden_states.0', .*'hidden_states.2'.*batched\): "
                    r"division by zero; these sites are disabled")
        with pytest.warns(UserWarning, match=expected):
            with torch.no_grad():
                out = model(input_ids=ids, attention_mask=mask)
    assert out.logits.shape[:2] == (3, 9)
    assert set(c._engine.disabled) == set(c.sites)


def test_batched_sites_compile_into_one_graph(tiny, backend):
    model = tiny("gpt2")
    backend(broken)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        twin = capture_grouped(model, 10**9, compile=True)
    backend("aot_eager")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compiled = capture_grouped(model, 10**9, compile=True)
    assert not _base._EAGER
    assert_same_states(twin, compiled)
