"""The hot path never synchronises with the host: inside probe's hooks, Tensor.item, .tolist,
.__bool__, .cpu and .numpy raise (they are what forces a CUDA sync), and a full capture with
every statistic still runs."""

from __future__ import annotations

import contextlib
import functools

import pytest
import torch

import probe
from probe.capture import Capture
from conftest import batch

SYNCING = ("item", "tolist", "__bool__", "cpu", "numpy")


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

    for name in ("_begin", "_end", "_observe"):
        monkeypatch.setattr(Capture, name, inside(getattr(Capture, name)))
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
