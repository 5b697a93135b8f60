"""The compiled updates (torch.compile of the moments' and per-position steps, the default on
accelerators) give the eager results, and a compiler failure falls back to eager with a warning.

CPU CI has no GPU and need not have a C++ toolchain, so the graphs are compiled with the
``aot_eager`` backend: dynamo traces each step into one graph (``fullgraph=True``: no breaks, no
host reads), AOT autograd lowers it to ATen ops, and those run eagerly. What inductor adds on a
GPU is code generation from that same graph.
"""

from __future__ import annotations

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


def capture_twice(model, **kw):
    with probe.capture(model, stats=STATS, skip_first=1, strict=True, **kw) as run:
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
    stat = next(iter(run._window.values()))["moments"]
    assert stat.compile is None
    assert not stat.compiled(torch.zeros(1, 1))
    assert stat.compiled(torch.zeros(1, 1, device="meta"))
