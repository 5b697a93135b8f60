"""The docstring examples of the read side run as doctests, against one prepared run.

Every example sees ``run``: a :class:`probe.results.run.Run` captured in memory from a tiny
2-layer GPT-2 (``n_embd=32``, default statistics, ``skip_first=0``) over a right-padded batch of
2 sequences of 6 and 4 real tokens, and ``tmp``: an empty folder it may write into. ``np``,
``os`` and ``probe`` are imported for it, so an example stays one or two lines.
"""

from __future__ import annotations

import doctest
import importlib

import pytest
import torch
import transformers

import probe

MODULES = ("probe.results.run", "probe.results.merge", "probe.present.report", "probe.present.research",
           "probe.present.quant", "probe.present.plot", "probe.present.html", "probe.present.timeline",
           "probe.capture.session",
           "probe.export", "probe.stats._buckets")
#: probe's top-level functions (their examples are not found through the package's module)
TOP_LEVEL = ("load", "merge")
#: a floor, so that the test cannot pass by finding no examples
AT_LEAST = 100


@pytest.fixture(scope="module")
def run():
    torch.manual_seed(0)
    model = transformers.GPT2Model(transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=97))
    model.eval()
    ids = torch.randint(0, 97, (2, 6))
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    with probe.capture(model, seed=0) as cap:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
    return cap.result


def _tests():
    finder = doctest.DocTestFinder(exclude_empty=True)
    found = []
    for name in MODULES:
        found += finder.find(importlib.import_module(name))
    for name in TOP_LEVEL:
        found += finder.find(getattr(probe, name), name=f"probe.{name}", module=probe, globs=vars(probe))
    return [t for t in found if t.examples]


def test_docstring_examples_run(run, tmp_path):
    import importlib.util
    import os

    import numpy as np

    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    tests = _tests()
    if importlib.util.find_spec("matplotlib") is None:  # the figures' examples need the plot extra
        tests = [t for t in tests if not t.name.startswith(("probe.present.plot", "probe.present.html"))]
    for i, test in enumerate(tests):
        folder = tmp_path / f"t{i}"
        folder.mkdir()
        test.globs.update(run=run, tmp=str(folder), np=np, os=os, probe=probe)
        runner.run(test)
    result = runner.summarize(verbose=False)
    print(f"{result.attempted} docstring examples in {len(tests)} docstrings")
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples failed (see above)"
    assert result.attempted >= AT_LEAST, f"only {result.attempted} docstring examples ran; expected >= {AT_LEAST}"


def test_examples_are_found():
    """The docstrings that must teach by example do (a sample of the public read side)."""
    names = {t.name for t in _tests()}
    for want in ("probe.load", "probe.merge", "probe.results.run.Run", "probe.results.run.SiteView",
                 "probe.results.run.SiteView.histogram", "probe.results.run.CrossView", "probe.results.run.ChannelView",
                 "probe.results.run.PositionView", "probe.results.run.SampleView", "probe.results.run.NormView",
                 "probe.present.report.summary", "probe.present.report.diff", "probe.present.plot.plot_run",
                 "probe.present.plot.plot_diff", "probe.present.research.is_massive"):
        assert want in names, want
