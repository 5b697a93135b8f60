"""The whole architecture zoo (tests/zoo.py): every model type of transformers' auto mapping that
can be built tiny and run on token ids is exact or refused with one line — never a silent mismatch.
A representative subset runs in the default suite (tests/test_architectures.py)."""

from __future__ import annotations

import pytest
import torch

import zoo


@pytest.mark.slow
def test_whole_zoo_has_no_silent_mismatch():
    torch.manual_seed(0)
    results = {kind: zoo.check(kind) for kind in zoo.model_types()}
    bad = {k: d for k, (s, d) in results.items() if s == "MISMATCH"}
    assert not bad, bad
    exact = sum(s == "exact" for s, _ in results.values())
    assert exact >= 100, exact  # the zoo really ran: most text models build tiny and compare exactly
