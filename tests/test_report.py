"""``probe diff``'s quantile shifts with their uncertainty (against the exact shifts of the
materialized tensors), the self-contained HTML report (opened in a headless Chromium), and the
read side's seams: integer histogram counts, ``probe show --site``, site numbers as text, merges."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch
import transformers

import probe
from probe import ProbeError
from probe.cli import main
from probe.present.report import DIFF_QUANTILES, diff, print_diff, quantile_bounds


def _model():
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=3, n_embd=32, n_head=2, vocab_size=100, n_positions=64)
    return transformers.GPT2LMHeadModel(config).eval()


def _batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 100, (4, 24), generator=g)
    lengths = torch.tensor([24, 20, 13, 7])
    mask = (torch.arange(24)[None, :] < lengths[:, None]).long()
    return {"input_ids": ids, "attention_mask": mask}


def _run(path, seed: int, skip_first: int = 1):
    """A capture of the tiny model over one batch, and the kept values of each hidden state
    (float64, materialized from output_hidden_states)."""
    model = _model()
    batch = _batch(seed)
    with torch.no_grad():
        hs = model(**batch, output_hidden_states=True).hidden_states
    with probe.capture(model, out=path, skip_first=skip_first, seed=seed) as cap:
        with torch.no_grad():
            model(**batch)
    mask = batch["attention_mask"].bool()
    keep = mask & ((mask.long().cumsum(-1) - 1) >= skip_first)
    values = {name: h[keep].double().numpy().ravel() for name, h in zip(cap.result.sites, hs)}
    return probe.load(path), values


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pair")
    a, va = _run(str(folder / "a.h5"), 1)
    b, vb = _run(str(folder / "b.h5"), 2)
    return a, b, va, vb


def test_each_quantile_lies_in_its_bounds(pair):
    a, _, va, _ = pair
    widths = 0
    for name in a.sites:
        s, x = a[name], va[name]
        bounds = quantile_bounds(s, DIFF_QUANTILES)
        exact = np.quantile(x, DIFF_QUANTILES)
        point = s.quantile(DIFF_QUANTILES)
        tol = 1e-12 * np.abs(x).max()
        assert np.all(bounds[:, 0] - tol <= exact) and np.all(exact <= bounds[:, 1] + tol), name
        assert np.all(bounds[:, 0] <= point) and np.all(point <= bounds[:, 1]), name
        widths += int(np.sum(bounds[:, 1] > bounds[:, 0]))
    assert widths > 0  # float32 data: the intervals have width, the containment is a real check


def test_diff_intervals_hold_the_exact_shift(pair, capsys):
    """Every reported interval, in the rows (JSON), holds np.quantile(b) - np.quantile(a); the
    table prints the intervals; the plot draws them as error bars around its bars."""
    a, b, va, vb = pair
    rows = diff(a, b)
    assert [r["site"] for r in rows] == a.sites
    unresolved = 0
    for r in rows:
        exact = np.quantile(vb[r["site"]], DIFF_QUANTILES) - np.quantile(va[r["site"]], DIFF_QUANTILES)
        tol = 1e-12 * (np.abs(va[r["site"]]).max() + np.abs(vb[r["site"]]).max())
        for q, e in zip(DIFF_QUANTILES, exact):
            lo, hi = r["quantile_shift_bounds"][str(q)]
            assert lo - tol <= e <= hi + tol, (r["site"], q, lo, e, hi)
            assert lo <= r["quantile_shift"][str(q)] <= hi
            unresolved += lo <= 0 <= hi
    json.dumps(rows)  # JSON-ready
    assert main(["diff", a.path, b.path, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(rows))
    from rich.console import Console

    console = Console(width=200, record=True, color_system=None)
    print_diff(rows, console)
    text = " ".join(console.export_text().split())
    lo, hi = rows[0]["quantile_shift_bounds"][str(DIFF_QUANTILES[-1])]
    assert f"{lo:+.3g} … {hi:+.3g}" in text and "the sign is not resolved" in text
    pytest.importorskip("matplotlib")
    from matplotlib.container import ErrorbarContainer

    from probe.present.plot import _diff_figure

    fig = _diff_figure(a, b)
    ax = next(ax for ax in fig.axes if ax.get_title().startswith("quantile shift"))
    from matplotlib.container import BarContainer

    bars = [c for c in ax.containers if isinstance(c, BarContainer)]
    errs = [c.errorbar for c in bars]
    assert len(bars) == len(DIFF_QUANTILES) and all(isinstance(e, ErrorbarContainer) for e in errs)
    std_a = np.array([a[r["site"]].std for r in rows])
    for q, err in zip(DIFF_QUANTILES, errs):
        segments = err.lines[2][0].get_segments()  # one vertical segment per site: the interval
        want = np.array([r["quantile_shift_bounds"][str(q)] for r in rows]) / std_a[:, None]
        got = np.array([[min(s[0][1], s[1][1]), max(s[0][1], s[1][1])] for s in segments])
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


def test_lossless_data_has_exact_bounds(tmp_path):
    model = _model().to(torch.bfloat16)
    with probe.capture(model, skip_first=0) as cap:
        with torch.no_grad():
            model(**_batch(3))
    s = cap.result["hidden_states.1"]
    assert s.histogram_lossless
    bounds = quantile_bounds(s, DIFF_QUANTILES)
    np.testing.assert_array_equal(bounds[:, 0], bounds[:, 1])
    np.testing.assert_array_equal(bounds[:, 0], s.quantile(DIFF_QUANTILES))


# ------------------------------------------------------------------------------- seams
def test_histogram_counts_fractional_or_integer(pair):
    a, _, va, _ = pair
    s, x = a["hidden_states.2"], va["hidden_states.2"]
    counts, edges = s.histogram(bins=37)
    whole, same = s.histogram(bins=37, integer=True)
    np.testing.assert_array_equal(edges, same)
    assert counts.dtype == np.float64 and np.any(counts != np.round(counts))  # the spread is fractional
    assert whole.dtype == np.int64 and int(whole.sum()) == x.size and np.all(whole >= 0)
    assert np.all(np.abs(whole - counts) <= 1.0)
    ref, _ = np.histogram(x, bins=edges)
    near = np.array([np.sum(np.abs(x - e) <= 2.0**-7 * abs(e) + 1e-30) for e in edges])
    # as close to numpy's counts as the spread is, give or take the rounding
    assert np.all(np.abs(np.cumsum(whole) - np.cumsum(ref)) <= near[1:] + 1)


def test_site_numbers_as_text_match_indices(pair, capsys):
    a = pair[0]
    assert a["1"] is a[1] is a["hidden_states.1"] and a["-1"] is a[-1] is a[a.sites[-1]]
    assert main(["show", a.path, "--site", "-1", "--json"]) == 0
    assert [s["site"] for s in json.loads(capsys.readouterr().out)["sites"]] == [a.sites[-1]]
    with pytest.raises(ProbeError, match="out of range"):
        a["-9"]


def test_show_site_keeps_to_that_site(pair, capsys):
    a = pair[0]
    assert main(["show", a.path, "--site", "2", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [e["site"] for e in data["research"]["sites"]] == ["hidden_states.2"]
    assert all(m["site"] == "hidden_states.2" for m in data["research"]["massive_topk"] + data["massive"])
    assert all(b["from"] == "hidden_states.2" or b["to"] == "hidden_states.2"
               for b in data["research"]["block_influence"])


def test_outlier_channels_of_one_site(pair):
    from probe.present.report import outlier_channels

    a = pair[0]
    every = outlier_channels(a)
    for name in a.sites:
        assert all(o in every for o in outlier_channels(a, at=[name]))
    assert outlier_channels(a, at=[]) == []


def test_run_help_states_every_default(capsys):
    import argparse

    from probe.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    actions = [a for a in sub.choices["run"]._actions if not isinstance(a, argparse._HelpAction)]
    assert len(actions) >= 14
    for action in actions:
        assert action.help and "default" in action.help, action.dest
    with pytest.raises(SystemExit):
        main(["run", "-h"])
    assert capsys.readouterr().out.count("default") >= len(actions)


def test_merge_refuses_a_run_given_twice_and_records_every_text(pair, tmp_path, capsys):
    from probe.store import annotate

    a, b = pair[0].path, pair[1].path
    assert main(["merge", a, a, "-o", str(tmp_path / "m.h5")]) == 2
    err = capsys.readouterr().err
    assert "is the same run as" in err and "doubles every count" in err and err.count("\n") == 1
    assert not os.path.exists(tmp_path / "m.h5")
    a2, b2 = str(tmp_path / "a.h5"), str(tmp_path / "b.h5")
    shutil.copy(a, a2)
    shutil.copy(b, b2)
    annotate(a2, texts=10)
    annotate(b2, texts=10)
    merged = probe.merge([a2, b2], tmp_path / "m.h5")
    assert merged.meta["texts"] == 20
    with pytest.raises(ProbeError, match="is the same run as"):
        probe.merge([a2, os.path.join(os.path.dirname(a2), ".", "a.h5")], tmp_path / "n.h5")


def test_repr_html(pair):
    a = pair[0]
    page = a._repr_html_()
    assert page.count("<tr>") == len(a.sites) + 1
    assert f"{a['hidden_states.1'].absmax:.4g}" in page


# --------------------------------------------------------------------------------- report
def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def test_report_is_self_contained(pair, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    a, b = pair[0], pair[1]
    out = tmp_path / "report.html"
    assert main(["report", a.path, b.path, "-o", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    page = out.read_text(encoding="utf-8")
    body = page.split("<body>", 1)[1]
    assert "<script" not in page and "<link" not in page and "http://" not in page and "https://" not in page
    assert "@import" not in page and "url(" not in page
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', body)
    from probe.present.plot import figures

    assert len(images) == len(figures(a)) + 1  # every figure of run a, and the diff
    for data in images:
        assert base64.b64decode(data)[:8] == b"\x89PNG\r\n\x1a\n"
    for want in ("Summary", "Massive activations", "Outlier channels", "Shift from run A to run B", "Δq0.999"):
        assert want in body, want
    lo, hi = diff(a, b)[0]["quantile_shift_bounds"][str(DIFF_QUANTILES[-1])]
    assert f"{lo:+.3g} … {hi:+.3g}" in body
    assert all(site in body for site in a.sites)
    assert main(["report", a.path, "-o", str(out)]) == 2  # exists
    assert "already exists" in capsys.readouterr().err


def test_report_renders_in_headless_chromium(pair, tmp_path):
    pytest.importorskip("matplotlib")
    browser = _chromium()
    if browser is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    from probe.present.html import write_report

    path = write_report(pair[0], tmp_path / "r.html", b=pair[1])
    common = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
              f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run(common + ["--dump-dom", f"file://{path}"], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "Massive activations" in dom.stdout and dom.stdout.count("<img") >= 2
    console = [line for line in dom.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert not console, console
    shot = tmp_path / "shot.png"
    run = subprocess.run(common + [f"--screenshot={shot}", "--window-size=1280,2000", f"file://{path}"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and shot.stat().st_size > 20_000, run.stderr[-2000:]
    if os.environ.get("PROBE_KEEP_SCREENSHOT"):
        shutil.copy(shot, os.environ["PROBE_KEEP_SCREENSHOT"])


# ----------------------------------------------------------------- sinks, report rows, diffs
SINK = 9000.0


@pytest.fixture(scope="module")
def sink(tmp_path_factory):
    """A tiny GPT-2 whose first block outputs N(0, 1) with one large value at the first position
    of every row (the largest, ``SINK``, at row 2 channel 7): an attention sink the kept tokens
    (skip_first=1) exclude. Returns the run, the tensor and the input ids."""
    torch.manual_seed(0)
    model = transformers.GPT2Model(transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100,
                                                           n_positions=64)).eval()
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 24, 32)).astype(np.float32)
    for row, channel in enumerate((3, 11, 7, 20)):
        x[row, 0, channel] = 2000.0 + 1000.0 * row if row != 2 else SINK
    ids = torch.randint(0, 100, (4, 24), generator=torch.Generator().manual_seed(5))

    def inject(module, args, output):
        (output[0] if isinstance(output, tuple) else output).copy_(torch.from_numpy(x))

    handle = model.h[0].register_forward_hook(inject)
    path = str(tmp_path_factory.mktemp("sink") / "s.h5")
    try:
        with probe.capture(model, out=path, skip_first=1, seed=0):
            with torch.no_grad():
                model(input_ids=ids, attention_mask=torch.ones(4, 24, dtype=torch.long))
    finally:
        handle.remove()
    return probe.load(path), x.astype(np.float64), ids.numpy()


def test_sink_rows_name_their_channel_and_token(sink):
    from probe.present.report import massive

    run, x, ids = sink
    hits = [m for m in massive(run) if m["site"] == "hidden_states.1" and m["kind"] == "sink"]
    assert len(hits) == 1
    head = np.abs(x[:, 0, :])  # the reference: the largest |x| at position 0, by numpy
    row, channel = np.unravel_index(np.argmax(head), head.shape)
    assert (hits[0]["row"], hits[0]["channel"], hits[0]["token"]) == (row, channel, ids[row, 0])
    assert hits[0]["absmax"] == head.max() == SINK


def _no_figures(monkeypatch) -> None:
    """The report's tables alone: its figures are tested in test_report_is_self_contained."""
    import probe.present.plot as plot

    monkeypatch.setattr(plot, "figures", lambda run, **kw: {})
    monkeypatch.setattr(plot, "_diff_figure", lambda a, b: (_ for _ in ()).throw(ProbeError("matplotlib")))


def test_report_rows_show_every_row_and_agree_with_their_colour(sink, tmp_path, monkeypatch):
    from probe.present.html import _CSS, report_html

    _no_figures(monkeypatch)
    run, x, _ = sink
    page = report_html(run)
    assert "max-height" not in _CSS and "max-height" not in page  # nothing hides rows
    summary = page.split('id="summary"', 1)[1].split("</table>", 1)[0]
    row = next(r for r in summary.split("<tr>") if "<td class=\"l\">hidden_states.1</td>" in r)
    kept = np.abs(x[:, 1:, :]).max()  # the kept tokens' absmax (skip_first=1) excludes the sink
    assert f"{kept:.4g}" in row
    # the red is on the number that earns it, and says where it is
    assert re.search(r'color:#b00020[^>]*>9000</span> \(sink p0 c7\)', row), row
    assert 'class="flag"' not in summary  # no whole row red beside a kept absmax that is not massive
    massive = page.split('id="massive"', 1)[1].split("</table>", 1)[0]
    sink_row = next(r for r in massive.split("<tr>") if ">sink<" in r and "hidden_states.1<" in r)
    cells = re.findall(r"<td[^>]*>([^<]*)</td>", sink_row)
    assert cells[5:7] == ["0", "7"] and cells[7] != "–"  # position, channel, token
    for heading in ("Summary", "Massive activations", "Outlier channels", "Figures"):
        assert re.search(rf"<h2[^>]*>{heading} — run [^<]*s\.h5", page), heading


def test_report_sections_name_runs_a_and_b(pair, monkeypatch):
    from probe.present.html import report_html

    _no_figures(monkeypatch)
    page = report_html(pair[0], pair[1])
    for heading in ("Summary — run A (a.h5)", "Summary — run B (b.h5)", "Massive activations — run A (a.h5)",
                    "Figures — run A (a.h5)", "Shift from run A (a.h5) to run B (b.h5)"):
        assert heading in page, heading
    links = re.findall(r'<a href="#([^"]+)"', page)
    assert len(links) == 5 and all(f'id="{target}"' in page for target in links), links


def test_diff_names_skip_first_not_the_token_count(tmp_path):
    from probe.present.report import describe, diff_warnings

    a, _ = _run(str(tmp_path / "a.h5"), 1, skip_first=1)
    b, _ = _run(str(tmp_path / "b.h5"), 1, skip_first=0)
    d = describe(a)
    assert d["real_tokens"] == int(_batch(1)["attention_mask"].sum()) and d["kept_tokens"] == d["real_tokens"] - 4
    lines = diff_warnings(a, b)
    assert len(lines) == 1 and "skip_first (1 vs 0)" in lines[0], lines
    assert f"{d['kept_tokens']} vs {d['real_tokens']} kept of the same {d['real_tokens']} real tokens" in lines[0]
    c_path = str(tmp_path / "c.h5")
    model = _model()
    with probe.capture(model, out=c_path, skip_first=1, stats=("moments", "histogram"), sites=["transformer.h.0"]):
        with torch.no_grad():
            model(**_batch(1))
    text = " | ".join(diff_warnings(a, probe.load(c_path)))
    assert "different sites" in text and "different statistics" in text and "skip_first" not in text


def test_values_below_the_resolution_print_as_zero():
    from rich.console import Console

    from probe.present.report import RESOLUTION, print_diff, resolution, shown

    row = {"site": "s", "mean_a": 9e-41, "mean_b": 0.25, "std_a": 1.0, "std_b": 2.0, "std_ratio": 2.0, "js": 0.1,
           "quantile_shift_bounds": {"0.001": [-0.5, -0.25], "0.5": [-9e-41, 9e-41], "0.999": [-1e-3, 3e-3]}}
    assert resolution(row) == 2.0 * RESOLUTION
    assert shown(1.9 * RESOLUTION, resolution(row)) == 0.0 and shown(2.1 * RESOLUTION, resolution(row)) != 0.0
    console = Console(width=200, record=True, file=open(os.devnull, "w"))
    print_diff([row], console)
    text = console.export_text()
    assert "e-41" not in text and "-0.5 … -0.25" in text and "-0.001 … +0.003" in text
    cells = [c.strip() for c in next(t for t in text.splitlines() if "│ s " in t).split("│")]
    assert cells[2] == "0" and cells[3] == "0.25"  # mean A: 9e-41 is below the resolution
    assert cells[7] == "+0"  # the median's interval: both ends below the resolution


def test_show_names_sites_one_way_and_block_influence_only_with_cos(tmp_path, capsys):
    from probe.cli import main

    path = str(tmp_path / "c.h5")
    model = _model()
    with probe.capture(model, out=path, skip_first=1, stats=("moments", "histogram", "cross", "cos", "norm")):
        with torch.no_grad():
            model(**_batch(1))
    assert main(["show", path]) == 0
    out = capsys.readouterr().out
    assert "hidden_states." not in out.split("hidden-state geometry", 1)[1].split("massive", 1)[0]
    run = probe.load(path)
    assert "block infl." in out
    for v in run.cross.block_influence:
        assert f"{v:.4g}" in out
    a, _ = _run(str(tmp_path / "a.h5"), 1)
    assert main(["show", a.path]) == 0
    assert "block infl." not in capsys.readouterr().out  # no cosines: no column of dashes


def test_cli_one_liners_for_an_html_report_and_a_lone_diff_argument(pair, tmp_path, capsys):
    from probe.cli import main

    page = tmp_path / "report.html"
    page.write_text("<!DOCTYPE html>\n<html><body>report</body></html>\n")
    assert main(["show", str(page)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is an HTML report (probe report), not an HDF5 run" in err
    assert main(["diff", pair[0].path]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "expected two runs, A and B; got one" in err and "required" not in err
