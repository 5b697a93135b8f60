"""The whole architecture zoo (tests/zoo.py): every model type of transformers' auto mapping that
can be built tiny and run on its main input (token ids, images, videos, audio, log-mel features) is
exact or refused with one line — never a silent mismatch. A representative subset runs in the
default suite (tests/test_architectures.py, tests/test_modalities.py)."""

from __future__ import annotations

import pytest
import torch

import zoo

#: model types the zoo cannot build or run (docs/architectures.md gives each one's reason): 143
#: of 631 with transformers 5.25.0, and 3 more for the models near the 60 s limit on a loaded
#: 2-core machine (SAM2's 1024 x 1024 images); a change that loses more of them fails here
CANNOT_BUILD_MAX = 146


@pytest.mark.slow
def test_whole_zoo_has_no_silent_mismatch():
    torch.manual_seed(0)
    results = {kind: zoo.check(kind) for kind in zoo.model_types()}
    bad = {k: d for k, (s, d) in results.items() if s == "MISMATCH"}
    assert not bad, bad
    exact = {k for k, (s, _) in results.items() if s == "exact"}
    assert len(exact) >= 100, len(exact)  # the zoo really ran: most text models build tiny and compare exactly
    assert {"vit", "convnext", "whisper", "wav2vec2", "clip", "videomae"} <= exact  # every modality
    cannot = sorted(k for k, (s, _) in results.items() if s == "cannot build")
    assert len(cannot) <= CANNOT_BUILD_MAX, cannot
