"""The hot path never synchronises with the host: inside probe's hooks, Tensor.item, .tolist,
.__bool__, .cpu and .numpy raise (they are what forces a CUDA sync), and a full capture with
every statistic still runs.

These run on CPU as a stand-in for an accelerator, so the CPU-only fast paths that read values on
the host (where that costs nothing) are turned off here: what is checked is the path a GPU takes."""

from __future__ import annotations

import contextlib
import functools

import pytest
import torch

import probe
from probe.capture.forward import Forwards
from conftest import batch

SYNCING = ("item", "tolist", "__bool__", "cpu", "numpy")


@pytest.fixture(autouse=True)
def device_path(monkeypatch):
    from probe.stats import _base

    monkeypatch.setattr(_base, "DENSE_CPU", False)


@contextlib.contextmanager
def no_sync_inside_hooks(monkeypatch):
    state = {"inside": 0, "calls": 0}

    def guard(name, original):
        @functools.wraps(original)
        def wrapper(self, *args, **kwargs):
            if state["inside"]:
                raise AssertionError(f"Tensor.{name} called inside a probe hook")
            return original(self, *args, **kwargs)

        return wrapper

    for name in SYNCING:
        monkeypatch.setattr(torch.Tensor, name, guard(name, getattr(torch.Tensor, name)))

    def inside(method):
        @functools.wraps(method)
        def wrapper(*args, **kwargs):
            state["inside"] += 1
            state["calls"] += 1
            try:
                return method(*args, **kwargs)
            finally:
                state["inside"] -= 1

        return wrapper

    for name in ("begin", "end", "observe"):
        monkeypatch.setattr(Forwards, name, inside(getattr(Forwards, name)))
    yield state


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_no_host_sync_in_hooks(tiny, family, monkeypatch):
    model = tiny(family)
    ids, mask = batch(3, 9, "left")
    with no_sync_inside_hooks(monkeypatch) as state:
        with probe.capture(model, skip_first=1, strict=True, sample_size=16) as run:
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask)
                model(input_ids=ids, attention_mask=mask)
        assert state["calls"] > 2 * len(run.sites)
    monkeypatch.undo()
    assert run["hidden_states.1"].tokens == 2 * (int(mask.sum()) - 3)


# what reads a device value on the host at the C++ level, where patching Python methods cannot see
# it: item()/bool()/int() of a tensor, and indexing with a 0-d tensor, go through
# _local_scalar_dense; nonzero and masked_select size their output from the data
HOST_READS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::unique_consecutive",
              "aten::_unique2"}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_no_host_reads_in_hooks_at_the_op_level(tiny, family, monkeypatch):
    from torch.profiler import ProfilerActivity, profile, record_function

    def scoped(method):
        @functools.wraps(method)
        def wrapper(*args, **kwargs):
            with record_function("probe.hook"):
                return method(*args, **kwargs)

        return wrapper

    for name in ("begin", "end", "observe"):
        monkeypatch.setattr(Forwards, name, scoped(getattr(Forwards, name)))
    model = tiny(family)
    ids, mask = batch(3, 9, "left")
    with probe.capture(model, skip_first=1, strict=True, sample_size=16) as run:
        with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
            model(input_ids=ids, attention_mask=mask)
            model(input_ids=ids, attention_mask=mask)
    inside, offending = 0, []
    for event in prof.events():
        parent = event.cpu_parent
        while parent is not None and parent.name != "probe.hook":
            parent = parent.cpu_parent
        if parent is None or event.name == "probe.hook":
            continue
        inside += 1
        if event.name in HOST_READS:
            chain, p = [], event.cpu_parent
            while p is not None and p.name != "probe.hook":
                chain.append(p.name)
                p = p.cpu_parent
            offending.append(f"{event.name} <- {' <- '.join(chain)}")
    assert inside > 100 * len(run.sites), inside  # the scopes saw probe's ops: the check is not vacuous
    assert not offending, offending[:5]
