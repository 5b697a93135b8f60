"""``probe timeline`` and ``probe watch``: a training loop with a planted spike and a planted NaN,
found at the right step, layer, channel, position and token; the series against float64 numpy
on the materialized hidden states; the robust score against a plain-Python reference."""

from __future__ import annotations

import json
import time
import math
import statistics

import numpy as np
import pytest
import torch
import transformers

import probe
from probe.cli import main
from probe.present.timeline import MAD_NORMAL, SCORED, plot_timeline, robust_scores, timeline

STEPS = 32
SPIKE, SPIKE_LAYER = 19, 2  # forward index; hidden_states.k is layer k-1's output
NAN, NAN_LAYER = 27, 3
CH, ROW, POS, TOKEN = 7, 1, 5, 42
NAN_CH, NAN_POS, NAN_TOKEN = 11, 8, 57


def _model():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=97)
    return transformers.LlamaForCausalLM(cfg).train()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """32 AdamW steps, every=1; step 20's batch carries token 42 at (row 1, position 5), whose
    channel 7 a hook raises by 200 std at layer 2's input (``hidden_states.2``); step 28 puts a NaN
    into channel 11 of token 57 at position 8 of ``hidden_states.3``. Returns the file and the
    float64 hidden states of every step (``output_hidden_states``, after the planted changes)."""
    path = tmp_path_factory.mktemp("timeline") / "train.h5"
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    plant = {"step": -1}

    def hook_at(layer):
        def hook(module, args, out):
            if plant["step"] not in ((SPIKE,) if layer == SPIKE_LAYER else (NAN,)):
                return None
            h = out[0] if isinstance(out, tuple) else out
            h = h.clone()
            if layer == SPIKE_LAYER:
                h[ROW, POS, CH] = h[ROW, POS, CH] + 200 * h.detach().std()
            else:
                h[ROW, NAN_POS, NAN_CH] = float("nan")
            return (h, *out[1:]) if isinstance(out, tuple) else h
        return hook

    # registered before the capture's hooks, so the capture sees the planted values
    handles = [model.model.layers[k - 1].register_forward_hook(hook_at(k)) for k in (SPIKE_LAYER, NAN_LAYER)]
    g = torch.Generator().manual_seed(1)
    hidden = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a width-32 model: a second thread only waits (and thrashes on busy cores)
    try:
        with probe.capture(model, out=path, every=1, max_positions=16, stats=("moments", "position", "topk", "norm")):
            for step in range(STEPS):
                ids = torch.randint(3, 97, (2, 12), generator=g)
                ids[(ids == TOKEN) | (ids == NAN_TOKEN)] = 3
                if step == SPIKE:
                    ids[ROW, POS] = TOKEN
                if step == NAN:
                    ids[ROW, NAN_POS] = NAN_TOKEN
                plant["step"] = step
                out = model(input_ids=ids, labels=ids, output_hidden_states=True)
                hidden.append([h.detach().double().numpy() for h in out.hidden_states])
                opt.zero_grad()
                out.loss.backward()
                opt.step()
    finally:
        torch.set_num_threads(threads)
        for h in handles:
            h.remove()
    return path, hidden


def _cli_json(capsys, *argv):
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


def test_planted_spike_and_nan_are_found(trained, capsys):
    path, _ = trained
    events = _cli_json(capsys, "timeline", str(path), "--json")
    jumps = [e for e in events if e["series"] != "nonfinite"]
    # exactly the planted jump: no earlier layer, no other step (noise scores stay below 10 here)
    assert [(e["step"], e["site"], e["layer"]) for e in jumps] == [(SPIKE + 1, f"hidden_states.{SPIKE_LAYER}",
                                                                   SPIKE_LAYER)]
    e = jumps[0]
    assert (e["channel"], e["position"], e["token"], e["row"] % 2) == (CH, POS, TOKEN, ROW)
    assert e["score"] > 100 and {"step", "site", "channel", "position", "token", "score"} <= set(e)
    assert e["sites"][0] == e["site"]
    bad = [e for e in events if e["series"] == "nonfinite"]
    assert len(bad) == 1
    b = bad[0]
    assert (b["step"], b["site"], b["layer"], b["position"]) == (NAN + 1, f"hidden_states.{NAN_LAYER}", NAN_LAYER,
                                                                NAN_POS)
    assert b["value"] == 1 and b["score"] is None  # one NaN value at the first site where it shows


def test_series_against_float64_hidden_states(trained):
    path, hidden = trained
    tl = timeline(probe.load(path))
    assert list(tl.steps) == list(range(1, STEPS + 1))
    for t, hs in enumerate(hidden):
        for i, h in enumerate(hs):
            name = f"hidden_states.{i}"
            x = h.reshape(-1, h.shape[-1])
            fin = x[np.isfinite(x)]
            assert tl.series["nonfinite"][name][t] == x.size - fin.size
            if not fin.size:
                assert math.isnan(tl.series["absmax"][name][t])
                continue
            assert tl.series["absmax"][name][t] == np.abs(fin).max()  # exact: float32 values
            np.testing.assert_allclose(tl.series["std"][name][t], fin.std(), rtol=1e-6)
            d = fin - fin.mean()
            kurt = (d ** 4).mean() / (d ** 2).mean() ** 2 - 3
            np.testing.assert_allclose(tl.series["kurtosis"][name][t], kurt, rtol=1e-5, atol=1e-6)
            norms = np.linalg.norm(x[np.isfinite(x).all(1)], axis=1)
            assert tl.series["norm_max"][name][t] == pytest.approx(norms.max(), rel=1e-6)
            # bucket quantiles: within 2^-7 relative of a value between the neighbouring order statistics
            q = tl.series["norm_p99"][name][t]
            lo, hi = np.quantile(norms, 0.99, method="lower"), np.quantile(norms, 0.99, method="higher")
            assert lo * (1 - 2 ** -7) <= q <= hi * (1 + 2 ** -7), (name, t)


def _reference_scores(x, window, min_history, floor):
    out = []
    for t, v in enumerate(x):
        h = [float(u) for u in x[max(0, t - window):t] if math.isfinite(u)]
        if len(h) < min_history or not math.isfinite(v):
            out.append(math.nan)
            continue
        med = statistics.median(h)
        mad = statistics.median(abs(u - med) for u in h)
        out.append((v - med) / max(MAD_NORMAL * mad, floor * abs(med), 1e-30))
    return np.array(out)


@pytest.mark.parametrize("window,min_history,floor", [(16, 8, 0.05), (5, 2, 0.0), (3, 3, 0.5)])
def test_robust_scores_against_reference(window, min_history, floor):
    rng = np.random.default_rng(window)
    x = rng.standard_t(3, 60) + 10
    x[[7, 30]] = np.nan
    x[40] = 80.0
    got = robust_scores(x, window, min_history, floor)
    want = _reference_scores(x, window, min_history, floor)
    np.testing.assert_allclose(got, want, rtol=1e-12, equal_nan=True)
    assert got[40] > 10  # the planted jump
    with pytest.raises(probe.ProbeError, match="min_history"):
        robust_scores(x, window=2, min_history=3)


def test_scores_in_the_timeline_are_the_series_scores(trained):
    path, _ = trained
    tl = timeline(probe.load(path), window=6, min_history=3, threshold=50.0)
    for k in SCORED:
        for n in tl.sites:
            np.testing.assert_array_equal(tl.scores[k][n], robust_scores(tl.series[k][n], 6, 3))
    # a higher threshold keeps the planted spike (its score is in the hundreds), at its first layer
    assert [(e.step, e.site) for e in tl.events] == [(SPIKE + 1, f"hidden_states.{SPIKE_LAYER}")]


def test_table_watch_and_plot(trained, capsys, tmp_path):
    path, _ = trained
    assert main(["timeline", str(path)]) == 0
    text = capsys.readouterr().out
    assert f"hidden_states.{SPIKE_LAYER}" in text and "first NaN/Inf" in text and f"step {NAN + 1}" in text
    assert main(["watch", str(path), "--once"]) == 0
    text = capsys.readouterr().out
    assert f"step {STEPS}" in text and "hidden_states.4" in text
    assert main(["watch", str(path), "--once", "--interval", "0"]) == 2
    assert "--interval" in capsys.readouterr().err
    assert main(["plot", str(path), "--kind", "timeline", "-o", str(tmp_path / "figs")]) == 0
    assert "timeline.png" in capsys.readouterr().out
    assert (tmp_path / "figs" / "timeline.png").stat().st_size > 10_000


def test_watch_reads_a_file_being_written(tmp_path, capsys):
    torch.set_num_threads(1)
    model = _model().eval()
    ids = torch.randint(3, 97, (2, 8), generator=torch.Generator().manual_seed(0))
    with probe.capture(model, out=tmp_path / "live.h5", every=1, stats=("moments", "norm")):
        for _ in range(3):
            with torch.no_grad():
                model(input_ids=ids)
        # the writer is still open; the third window's commit runs beside the forward, so a live
        # reader sees it once its writer has written it (within moments)
        deadline, text = time.monotonic() + 30, ""
        while "step 3" not in text and time.monotonic() < deadline:
            assert main(["watch", str(tmp_path / "live.h5"), "--once"]) == 0
            text = capsys.readouterr().out
            time.sleep(0.02)
        assert "step 3" in text
        assert main(["timeline", str(tmp_path / "live.h5"), "--json"]) == 0
        assert json.loads(capsys.readouterr().out) == []  # three identical batches: nothing jumps
    torch.set_num_threads(2)


def test_one_window_and_bad_options(tmp_path, capsys):
    model = _model().eval()
    with probe.capture(model, out=tmp_path / "one.h5", stats=("moments",)):
        with torch.no_grad():
            model(input_ids=torch.arange(3, 11).view(1, -1))
    tl = timeline(probe.load(tmp_path / "one.h5"))
    assert len(tl.steps) == 1 and tl.events == [] and tl.first_nonfinite is None
    with pytest.raises(probe.ProbeError, match="two or more windows"):
        plot_timeline(tl)
    assert main(["timeline", str(tmp_path / "one.h5"), "--threshold", "0"]) == 2
    assert "threshold must be > 0" in capsys.readouterr().err
