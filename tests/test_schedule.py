"""capture(schedule=...) and ProbeCallback(schedule=...): skipped forwards leave every statistic
untouched, and what is recorded equals a capture that saw only the recorded forwards."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import transformers

import probe


def _batches(count: int, b: int = 2, t: int = 7):
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(count):
        ids = torch.randint(3, 97, (b, t), generator=g)
        mask = torch.ones(b, t, dtype=torch.long)
        mask[0, :2] = 0  # left padding in one row
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def _raw(run) -> dict:
    """Every state array of the run, sample excluded (its keys are seeded by the forward count)."""
    total = getattr(run, "result", run).total
    flat = {f"cross/{k}": v for k, v in total.cross.items()}
    for site, per in total.sites.items():
        for kind, state in per.items():
            if kind != "sample":
                flat.update({f"{site}/{kind}/{k}": v for k, v in state.items()})
    return flat


def test_skipped_forwards_touch_nothing(tiny, monkeypatch):
    model = tiny("gpt2")
    calls = []
    from probe.capture.engine import StatEngine
    from probe.capture.forward import Forwards

    for cls, name in ((Forwards, "observe"), (StatEngine, "fold"), (StatEngine, "_run_stats"),
                      (Forwards, "_start"), (Forwards, "_stage")):
        original = getattr(cls, name)
        monkeypatch.setattr(cls, name, lambda self, *a, _o=original, _n=name, **k: (calls.append(_n), _o(self, *a, **k))[1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "sites recorded nothing" warning: the schedule skipped them
        with probe.capture(model, schedule=lambda i: False, every=2) as run:
            with torch.no_grad():
                for batch in _batches(3):
                    model(**batch)
    assert calls == []
    assert run.steps == [2]  # skipped forwards count toward every=; the empty last window is not written
    for row in run.result.rows:
        assert all(state == {} for per in row.sites.values() for state in per.values())
        assert row.cross == {}


@pytest.mark.parametrize("stats", [None, ("moments", "histogram", "position")])
def test_recorded_forwards_equal_a_capture_of_only_them(tiny, stats):
    model = tiny("gpt2")
    batches = _batches(5)
    active = {1, 3}
    with probe.capture(model, stats=stats, skip_first=1, schedule=lambda i: i in active) as run:
        with torch.no_grad():
            for batch in batches:
                model(**batch)
    with probe.capture(model, stats=stats, skip_first=1) as ref:
        with torch.no_grad():
            for i in sorted(active):
                model(**batches[i])
    got, want = _raw(run), _raw(ref)
    assert got.keys() == want.keys() and got
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    assert run["hidden_states.1"].tokens == 2 * (2 * 7 - 2 - 2)  # per forward: 2 padded, 2 skipped by skip_first
    if stats is None:  # every sampled value is the hidden state of a recorded forward at its place
        with torch.no_grad():
            hs = [model(**batches[i], output_hidden_states=True).hidden_states[1] for i in sorted(active)]
        stacked = torch.cat(hs).double().numpy()  # rows in recording order
        s = run["hidden_states.1"].sample
        col = s.position + 2 * (s.row % 2 == 0)  # row 0 of each batch is left-padded by 2
        np.testing.assert_array_equal(stacked[s.row, col, s.channel], s.value)


def test_profiler_schedule_object(tiny):
    model = tiny("gpt2")
    schedule = torch.profiler.schedule(wait=1, warmup=1, active=1, repeat=2)  # records forwards 2 and 5
    with probe.capture(model, stats=("moments",), schedule=schedule) as run:
        with torch.no_grad():
            for batch in _batches(7):
                model(**batch)
    with probe.capture(model, stats=("moments",)) as ref:
        with torch.no_grad():
            for i in (2, 5):
                model(**_batches(7)[i])
    assert run["hidden_states.0"].tokens == ref["hidden_states.0"].tokens == 2 * 12
    np.testing.assert_array_equal(_raw(run)["hidden_states.2/moments/m2"], _raw(ref)["hidden_states.2/moments/m2"])


@pytest.mark.parametrize("schedule, match", [
    (25, r"schedule must be a callable forward_index -> bool or a torch.profiler.schedule; got int 25; pass"),
    (lambda i: i % 2, r"schedule must return a bool or a torch.profiler.ProfilerAction; schedule\(0\) returned int"),
    (lambda: True, r"schedule must accept a 0-based forward index; schedule\(0\) raised TypeError"),
])
def test_bad_schedule_one_line(tiny, schedule, match, assert_hooks_restored):
    model = tiny("gpt2")
    with assert_hooks_restored(model):
        with pytest.raises(probe.ProbeError, match=match) as info:
            probe.capture(model, schedule=schedule)
    assert "\n" not in str(info.value)


def test_trainer_callback_schedule(tiny, tmp_path):
    from probe.integrations import ProbeCallback

    model = tiny("gpt2")
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(3, 97, (8,), generator=g)} for _ in range(12)]
    data = [dict(r, labels=r["input_ids"], attention_mask=torch.ones(8, dtype=torch.long)) for r in rows]
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "t"), per_device_train_batch_size=2,
                                          gradient_accumulation_steps=2, max_steps=3, report_to=[],
                                          logging_steps=100, save_strategy="no", use_cpu=True, disable_tqdm=True)
    cb = ProbeCallback(out=tmp_path / "train.h5", every=1, schedule=lambda step: step == 1)
    transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[cb]).train()
    run = probe.load(tmp_path / "train.h5")
    assert run.steps == [1, 2, 3]
    # step index 1 (the second optimizer step, committed with label 2): two micro-batches of 2 x 8
    assert [run.at(s)["hidden_states.1"].tokens for s in (2,)] == [2 * 2 * 8]
    assert all(not state for s in (1, 3) for state in run.at(s).total.sites["hidden_states.1"].values())
    with pytest.raises(probe.ProbeError, match=r"schedule must be a callable optimizer step_index -> bool"):
        ProbeCallback(out=tmp_path / "x.h5", schedule="often")
