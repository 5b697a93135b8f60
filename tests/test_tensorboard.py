"""The TensorBoard export, read back with TensorBoard's own event reader and compared exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import probe
from probe.results.run import Run

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from probe.export.tensorboard import write_tensorboard  # noqa: E402


def _read(logdir):
    acc = EventAccumulator(str(logdir), size_guidance={"histograms": 0, "scalars": 0})
    acc.Reload()
    return acc


def test_every_window_at_its_step_exactly(tiny, tmp_path):
    model = tiny("gpt2")
    g = torch.Generator().manual_seed(0)
    batches = []
    for b in (2, 3):
        ids = torch.randint(0, 97, (b, 9), generator=g)
        mask = torch.ones(b, 9, dtype=torch.long)
        mask[0, :3] = 0
        batches.append((ids, mask))
    with probe.capture(model, out=tmp_path / "r.h5", stats=probe.stats.NAMES) as cap:
        for step, (ids, mask) in zip((5, 12), batches):
            model(input_ids=ids, attention_mask=mask)
            cap.snapshot(step=step)
    run = probe.load(tmp_path / "r.h5")
    write_tensorboard(run, tmp_path / "tb")
    acc = _read(tmp_path / "tb")
    tags = acc.Tags()
    for step, (ids, mask) in zip((5, 12), batches):
        with torch.no_grad():
            hs = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        valid = mask.bool().numpy()
        for i, name in enumerate(run.sites):
            x = hs[i].float().numpy()[valid].astype(np.float64).reshape(-1)
            (event,) = [e for e in acc.Histograms(f"probe/values/{name}") if e.step == step]
            h = event.histogram_value
            assert h.min == np.float32(x.min()) and h.max == np.float32(x.max())
            assert h.num == x.size
            # float64 sums derived from the moments (relative error ~1e-7, docs/statistics.md)
            np.testing.assert_allclose(h.sum, x.sum(), rtol=1e-9, atol=1e-7 * np.abs(x).sum())
            np.testing.assert_allclose(h.sum_squares, (x * x).sum(), rtol=1e-6)
            # the event file holds exactly what probe computed
            m = run.rows[run.steps.index(step)].sites[name]["moments"]
            # (the same float64 formula; numpy's summation order may move the last bit: 1e-14 relative)
            assert h.sum == pytest.approx(float((m["n"] * m["mean"]).sum()), rel=1e-14, abs=1e-300)
            assert h.sum_squares == pytest.approx(float((m["m2"] + m["n"] * m["mean"] ** 2).sum()), rel=1e-14)
            # buckets: counts add up; every value lies in its bucket (limits are upper edges;
            # a negative float-bit bucket holds (-hi, -lo], a positive one [lo, hi))
            limits, counts = np.asarray(h.bucket_limit), np.asarray(h.bucket)
            assert counts.sum() == x.size and np.all(np.diff(limits) > 0)
            x32 = x.astype(np.float32).astype(np.float64)
            lower = np.concatenate([[-np.inf], limits[:-1]])
            for lo, hi, c in zip(lower, limits, counts):
                inside = ((x32 > lo) & (x32 <= hi)) if hi <= 0 else ((x32 >= lo) & (x32 < hi))
                assert inside.sum() == c
            w = Run(run.meta, [run.rows[run.steps.index(step)]])[name]
            for key in ("std", "kurtosis", "absmax", "nan", "posinf", "neginf"):
                (ev,) = [e for e in acc.Scalars(f"probe/{key}/{name}") if e.step == step]
                assert ev.value == float(np.float32(getattr(w, key))), key
            np.testing.assert_allclose(w.std, x.std(), rtol=1e-6)
            norms = np.linalg.norm(hs[i].float().numpy()[valid].astype(np.float64), axis=1)
            (event,) = [e for e in acc.Histograms(f"probe/norm/{name}") if e.step == step]
            assert event.histogram_value.num == len(norms)
            np.testing.assert_allclose(event.histogram_value.sum, norms.sum(), rtol=1e-6)
    assert f"probe/block_influence/{run.sites[0]}" in tags["scalars"]
    (ev,) = [e for e in acc.Scalars(f"probe/block_influence/{run.sites[0]}") if e.step == 12]
    assert ev.value == float(np.float32(run.at(12).cross.block_influence[0]))


def test_missing_run_refused(tmp_path):
    with pytest.raises(probe.ProbeError, match="must be a probe Run"):
        write_tensorboard("nope.h5", tmp_path / "tb")


def test_trainer_callback_logs_live(tiny, tmp_path):
    import transformers

    from probe.integrations import ProbeCallback

    model = tiny("gpt2")
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(3, 97, (8,), generator=g)} for _ in range(10)]
    data = [dict(r, labels=r["input_ids"], attention_mask=torch.ones(8, dtype=torch.long)) for r in rows]
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "t"), per_device_train_batch_size=2,
                                          max_steps=3, report_to=[], logging_steps=100, save_strategy="no",
                                          use_cpu=True, disable_tqdm=True)
    cb = ProbeCallback(out=tmp_path / "train.h5", every=2, tensorboard=tmp_path / "tb", stats=("moments", "histogram"))
    transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[cb]).train()
    run = probe.load(tmp_path / "train.h5")
    assert run.steps == [2, 3]
    acc = _read(tmp_path / "tb")
    name = run.sites[1]
    events = acc.Histograms(f"probe/values/{name}")
    assert [e.step for e in events] == [2, 3]
    for e in events:
        w = run.at(e.step)[name]
        assert e.histogram_value.num == w.count and e.histogram_value.max == np.float32(w.max)
    assert [e.value for e in acc.Scalars(f"probe/std/{name}")] == [float(np.float32(run.at(s)[name].std))
                                                                  for s in (2, 3)]
