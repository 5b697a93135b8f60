"""Top-k magnitudes, per-token norms, layer-to-layer cosines and anisotropy against float64 numpy
on the materialised hidden states; merges equal one pass."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import probe
from probe.results.run import TOPK_DTYPE, topk_array
from probe.stats import NAMES, Norm, Tokens, TopK
from probe.stats._state import merge_states

GUARANTEE = lambda m: 2.0**-m / (2 + 2.0**-m)  # noqa: E731


def _tokens(n, valid=None, keep=None, position=None, row=None):
    valid = torch.ones(n, dtype=torch.bool) if valid is None else valid
    keep = valid.clone() if keep is None else keep
    position = torch.arange(n) if position is None else position
    row = torch.zeros(n, dtype=torch.long) if row is None else row
    return Tokens(valid, keep, position, row, torch.arange(n) % 50, 1, 0)


def ref_topk(x, valid, row, position, token, k):
    """float64 numpy: the k largest finite |x| over valid tokens, ties to the earliest
    (row, position, channel)."""
    n, d = x.shape
    r = np.repeat(row, d)
    p = np.repeat(position, d)
    c = np.tile(np.arange(d), n)
    t = np.repeat(token, d)
    v = x.reshape(-1).astype(np.float64)
    ok = np.repeat(valid, d) & np.isfinite(v)
    order = np.lexsort((c[ok], p[ok], r[ok], -np.abs(v[ok])))[:k]
    out = np.empty(len(order), dtype=TOPK_DTYPE)
    for name, a in (("value", v[ok]), ("row", r[ok]), ("position", p[ok]), ("channel", c[ok]), ("token", t[ok])):
        out[name] = a[order]
    return out


@pytest.mark.parametrize("chunks", [1, 3, 7])
def test_topk_stat_exact_with_ties_and_nonfinite(chunks):
    rng = np.random.default_rng(0)
    n, d, k = 90, 12, 40
    x = np.round(rng.standard_t(3, size=(n, d)), 0).astype(np.float32)  # many exact ties
    x[5, 3] = np.nan
    x[6, 1] = np.inf
    x[7, :] = -np.inf
    x[8, 2] = 2500.0
    valid = rng.random(n) > 0.2
    valid[8] = False  # the largest value is padding: never in the top k
    row = np.repeat(np.arange(9), 10)
    position = np.tile(np.arange(10), 9)
    st = TopK(k)
    for idx in np.array_split(np.arange(n), chunks):
        t = _tokens(len(idx), torch.from_numpy(valid[idx]), None, torch.from_numpy(position[idx]),
                    torch.from_numpy(row[idx]))
        t = Tokens(t.valid, t.keep, t.position, t.row, torch.from_numpy(idx % 50), 1, 0)
        st.update(torch.from_numpy(x[idx]), t)
    got = topk_array({f: v.numpy() for f, v in st.state_dict().items()})
    want = ref_topk(x, valid, row, position, np.arange(n) % 50, k)
    assert got.dtype == TOPK_DTYPE
    np.testing.assert_array_equal(got, want)


def test_topk_fewer_elements_than_k_and_merge_commutes():
    x = np.arange(12, dtype=np.float32).reshape(3, 4) - 6
    a, b = TopK(20), TopK(20)
    a.update(torch.from_numpy(x[:2]), _tokens(2, row=torch.tensor([0, 0])))
    b.update(torch.from_numpy(x[2:]), _tokens(1, position=torch.tensor([2]), row=torch.tensor([0])))
    parts = [{f: v.numpy() for f, v in s.state_dict().items()} for s in (a, b)]
    ab, ba = merge_states("topk", parts), merge_states("topk", parts[::-1])
    for f in ab:
        np.testing.assert_array_equal(ab[f], ba[f])
    got = topk_array(ab)
    want = ref_topk(x, np.ones(3, bool), np.zeros(3, np.int64), np.arange(3), np.array([0, 1, 0]), 20)
    np.testing.assert_array_equal(got, want)
    assert len(got) == 12


def _batch(seed=0, b=3, t=11, pad=True):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 97, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    if pad:
        mask[1, :4] = 0  # left padding
        mask[-1, :1] = 0
    return ids, mask


def _reference(model, batches, skip_first=0):
    """Materialised hidden states of every batch: per site the stacked real tokens, with their
    rows, positions, token ids and keep flags (float64)."""
    per: dict[int, list] = {}
    meta = {"row": [], "position": [], "token": [], "keep": []}
    rows = 0
    for ids, mask in batches:
        with torch.no_grad():
            hs = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        valid = mask.bool().numpy()
        pos = (mask.cumsum(-1) - 1).numpy()
        meta["row"].append((rows + np.arange(ids.shape[0]))[:, None].repeat(ids.shape[1], 1)[valid])
        meta["position"].append(pos[valid])
        meta["token"].append(ids.numpy()[valid])
        meta["keep"].append(pos[valid] >= skip_first)
        for i, h in enumerate(hs):
            per.setdefault(i, []).append(h.float().numpy()[valid].astype(np.float64))
        rows += ids.shape[0]
    return [np.concatenate(v) for _, v in sorted(per.items())], {k: np.concatenate(v) for k, v in meta.items()}


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_capture_topk_norm_cos_against_numpy(tiny, kind, tmp_path):
    model = tiny(kind)
    with torch.no_grad():  # give the first token a massive value, as real models have
        emb = model.get_input_embeddings().weight
        emb[7] *= 400
    batches = [_batch(0), _batch(1, b=2, t=9)]
    batches[0][0][0, 0] = 7
    skip = 1
    with probe.capture(model, out=tmp_path / "r.h5", skip_first=skip, every=1, stats=NAMES) as run:
        for ids, mask in batches:
            model(input_ids=ids, attention_mask=mask)
    run = probe.load(tmp_path / "r.h5")
    hs, meta = _reference(model, batches, skip)
    keep = meta["keep"]
    for i, name in enumerate(run.sites):
        h = hs[i]
        s = run[name]
        # top k over every real token, first positions included
        want = ref_topk(h.astype(np.float32), np.ones(len(h), bool), meta["row"], meta["position"], meta["token"], 64)
        got = s.topk
        np.testing.assert_array_equal(got["value"], want["value"])
        for f in ("row", "position", "channel", "token"):
            np.testing.assert_array_equal(got[f], want[f], err_msg=f)
        # norms over kept tokens
        norms = np.linalg.norm(h[keep], axis=1)
        nv = s.norm
        assert nv.count == len(norms)
        np.testing.assert_allclose(nv.mean, norms.mean(), rtol=1e-6)
        # the norms are float32 (relative error ~1e-7 each): the error of their spread grows as
        # mean / std, which is large where a norm layer makes every norm nearly equal
        cond = norms.mean() / norms.std()
        np.testing.assert_allclose(nv.std, norms.std(), rtol=1e-6 * cond)
        kurt = ((norms - norms.mean()) ** 4).mean() / norms.var() ** 2 - 3
        np.testing.assert_allclose(nv.kurtosis, kurt, rtol=0, atol=4e-6 * cond * (kurt + 3))
        np.testing.assert_allclose([nv.min, nv.max], [norms.min(), norms.max()], rtol=1e-6)
        np.testing.assert_allclose(nv.scale, np.sqrt(h.shape[1]) / norms.mean(), rtol=1e-6)
        for q in (0.0, 0.1, 0.5, 0.9, 1.0):
            exact = np.quantile(norms, q)
            assert abs(nv.quantile(q) - exact) <= (GUARANTEE(7) + 1e-6) * exact
        # per position over every real token
        allnorm = np.linalg.norm(h, axis=1)
        p = meta["position"]
        for pos in range(int(p.max()) + 1):
            np.testing.assert_allclose(nv.position_mean[pos], allnorm[p == pos].mean(), rtol=1e-6)
            here = allnorm[p == pos]
            np.testing.assert_allclose(nv.position_std[pos], here.std(), rtol=0, atol=1e-6 * here.mean())
        # anisotropy: mean cosine over distinct kept tokens
        u = h[keep] / norms[:, None]
        cos = u @ u.T
        m = len(u)
        aniso = (cos.sum() - np.trace(cos)) / (m * (m - 1))
        np.testing.assert_allclose(s.anisotropy, aniso, rtol=1e-5, atol=1e-7)
    # layer-to-layer cosine, kept tokens and every real token
    units = [h / np.linalg.norm(h, axis=1, keepdims=True) for h in hs]
    for view, mask in (("cos", keep), ("cos_all", np.ones(len(keep), bool))):
        want = np.array([[np.mean((a[mask] * b[mask]).sum(1)) for b in units] for a in units])
        np.testing.assert_allclose(getattr(run.cross, view), want, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(run.cross.block_influence,
                               1 - np.array([np.mean((units[j][keep] * units[j + 1][keep]).sum(1))
                                             for j in range(len(units) - 1)]), rtol=1e-9, atol=1e-12)
    assert run.cross.cos_n == keep.sum()
    # the massive value at the first token is found, with its token
    assert run[run.sites[0]].topk[0]["position"] == 0 and run[run.sites[0]].topk[0]["token"] == 7


def test_windows_and_files_merge_like_one_pass(tiny, tmp_path):
    model = tiny("gpt2")
    ids, mask = _batch(3, b=4, t=12)
    with probe.capture(model, seed=1, stats=NAMES) as one:
        model(input_ids=ids, attention_mask=mask)
    with probe.capture(model, out=tmp_path / "w.h5", every=1, seed=1, stats=NAMES) as _:
        model(input_ids=ids[:2], attention_mask=mask[:2])
        model(input_ids=ids[2:], attention_mask=mask[2:])
    split = probe.load(tmp_path / "w.h5")
    assert len(split.steps) == 2
    for name in one.sites:
        a, b = one[name], split[name]
        np.testing.assert_array_equal(a.topk, b.topk)
        for f in ("count", "mean", "std", "kurtosis", "min", "max", "scale"):
            np.testing.assert_allclose(getattr(b.norm, f), getattr(a.norm, f), rtol=1e-9, err_msg=f)
        # sum of unit vectors: float32 per forward, so another split rounds differently (cos units)
        np.testing.assert_allclose(b.anisotropy, a.anisotropy, rtol=0, atol=1e-6)
        np.testing.assert_array_equal(a.norm.counts, b.norm.counts)
        np.testing.assert_allclose(b.norm.position_mean, a.norm.position_mean, rtol=1e-12)
    np.testing.assert_allclose(split.cross.cos, one.cross.cos, rtol=1e-12)
    np.testing.assert_array_equal(split.cross.cos_hist, one.cross.cos_hist)


def test_norm_nonfinite_tokens_left_out():
    x = torch.randn(6, 8)
    x[1, 2] = float("nan")
    x[4, 0] = float("inf")
    st = Norm(7, 16)
    st.update(x, _tokens(6))
    s = {k: v.numpy() for k, v in st.state_dict().items()}
    assert int(s["nonfinite"]) == 2 and float(s["n"]) == 4 and float(s["unit_n"]) == 4
    ok = np.array([0, 2, 3, 5])
    np.testing.assert_allclose(float(s["mean"]), np.linalg.norm(x.double().numpy()[ok], axis=1).mean(), rtol=1e-6)
    assert s["counts"].sum() == 4 and np.isfinite(s["unit_sum"]).all()


@pytest.mark.slow
def test_two_ranks_merge_like_one_process(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root / "src"))
    example = str(root / "examples" / "distributed.py")
    script = tmp_path / "every_stat.py"  # the example, capturing every statistic (cosines too)
    script.write_text("import runpy, sys\nimport probe.stats\nprobe.stats.DEFAULT = probe.stats.NAMES\n"
                      f"sys.argv[0] = {example!r}\nrunpy.run_path({example!r}, run_name='__main__')\n")
    script = str(script)
    two, one = tmp_path / "two.h5", tmp_path / "one.h5"
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                    script, "-o", str(two), "--every", "2"], check=True, env=env, cwd=tmp_path,
                   capture_output=True, timeout=300)
    subprocess.run([sys.executable, script, "-o", str(one)], check=True, env=env, cwd=tmp_path,
                   capture_output=True, timeout=300)
    a, b = probe.load(two), probe.load(one)
    assert "cos" in a.stats and a.cross.cos_n > 0
    for name in a.sites:
        x, y = a[name], b[name]
        # rows are numbered per rank, so ties (equal embeddings of equal tokens) may resolve to
        # other elements; the values are the same, and so is every entry above the last value
        np.testing.assert_array_equal(x.topk["value"], y.topk["value"])
        inner = np.abs(x.topk["value"]) > np.abs(x.topk["value"][-1])
        key = lambda t: sorted(zip(t["value"][inner], t["position"][inner], t["channel"][inner],  # noqa: E731
                                   t["token"][inner]))
        assert inner.sum() > 0 and key(x.topk) == key(y.topk)
        assert x.norm.count == y.norm.count
        np.testing.assert_array_equal(x.norm.counts, y.norm.counts)
        for f in ("mean", "std", "kurtosis", "min", "max", "scale"):
            np.testing.assert_allclose(getattr(x.norm, f), getattr(y.norm, f), rtol=1e-9, err_msg=f)
        np.testing.assert_allclose(x.norm.position_mean, y.norm.position_mean, rtol=1e-12)
        np.testing.assert_allclose(x.anisotropy, y.anisotropy, rtol=0, atol=1e-6)
    np.testing.assert_allclose(a.cross.cos, b.cross.cos, rtol=1e-12)
    np.testing.assert_allclose(a.cross.cos_all, b.cross.cos_all, rtol=1e-12)
    np.testing.assert_array_equal(a.cross.cos_hist, b.cross.cos_hist)


def test_show_massive_rule_and_block_influence(tiny, capsys):
    from rich.console import Console

    from probe.present import research
    from probe.present.report import print_summary, summary

    model = tiny("gpt2")
    with torch.no_grad():
        model.get_input_embeddings().weight[7] *= 5000  # first-token massive values
    ids, mask = _batch(4)
    ids[:, 0] = 7
    ids[2, :5] = 7  # padding of row 2 hides these: only its real tokens count
    with probe.capture(model, stats=NAMES) as run:
        model(input_ids=ids, attention_mask=mask)
    r = run.result
    r.meta["token_text"] = {"7": "<s>"}
    hs, meta = _reference(model, [(ids, mask)])
    hits = research.massive_topk(r)
    for i, name in enumerate(r.sites):
        x = np.abs(hs[i])
        med = np.median(x)
        top = np.sort(x.reshape(-1))[::-1][:64]
        want = top[(top > 100) & (top > 1000 * med)]
        got = [abs(h["value"]) for h in hits if h["site"] == name]
        np.testing.assert_array_equal(np.sort(got)[::-1], want.astype(np.float32))
    assert hits and all(h["text"] == "<s>" and h["token"] == 7 for h in hits)
    data = summary(r)["research"]
    np.testing.assert_allclose([b["value"] for b in data["block_influence"]], r.cross.block_influence)
    print_summary(r, Console(width=160, record=True))
    out = capsys.readouterr().out
    assert "hidden-state geometry" in out and "massive activations" in out and "'<s>'" in out


@pytest.mark.parametrize("group_elements, size", [(10**9, 3), (2 * 3 * 11 * 32, 2)])
def test_batched_sites_equal_site_by_site(tiny, group_elements, size, monkeypatch):
    """Sites batched into one update (as on an accelerator; all of them, or pairs) give what each
    site gives alone: top-k and norm counts exactly, float sums to rounding."""
    model = tiny("llama")
    ids, mask = _batch(5)  # 3 x 11 tokens of 32 channels
    sizes = []
    original = TopK.update_group.__func__

    def recorded(cls, stats, x, tokens):
        sizes.append(len(stats))
        original(cls, stats, x, tokens)

    monkeypatch.setattr(TopK, "update_group", classmethod(recorded))
    from probe.capture import engine

    monkeypatch.setattr(engine, "STACK_ELEMENTS", 0)  # the reference run goes site by site, not stacked
    runs = []
    for limit in (0, group_elements):
        c = probe.capture(model, stats=("topk", "norm"), seed=0)
        c._engine.group_elements = limit
        with c:
            model(input_ids=ids, attention_mask=mask)
        runs.append(c.result)
    a, b = runs
    assert max(sizes) == size  # batches did form
    for name in a.sites:
        for kind in ("topk", "norm"):
            for field, x in a.total.sites[name][kind].items():
                y = b.total.sites[name][kind][field]
                if x.dtype.kind in "iub" or kind == "topk" or field in ("min", "max", "n", "pos_n"):
                    np.testing.assert_array_equal(y, x, err_msg=f"{name} {kind} {field}")
                else:
                    np.testing.assert_allclose(y, x, rtol=1e-6, atol=1e-6 * np.abs(x).max(), err_msg=field)


def test_states_without_the_cosine_fields_still_merge():
    """Windows written before the cosines existed (schema-1 files) merge; the cosines read as empty."""
    from probe.results.run import CrossView
    from probe.stats._state import empty_state

    old = empty_state("cross", {"S": 3, "C": 4096})
    for f in ("keep_cos", "keep_cos_n", "all_cos", "all_cos_n", "keep_cos_hist"):
        del old[f]
    old["keep_n"] = np.float64(4.0)
    merged = merge_states("cross", [old, dict(old)])
    assert merged["keep_n"] == 8 and merged["keep_cos"].shape == (3, 3) and merged["keep_cos_n"] == 0
    assert np.isnan(CrossView(["a", "b", "c"], merged).cos).all()


def test_cli_run_decodes_topk_tokens(smollm, tmp_path, capsys):
    import json

    import transformers

    from probe.cli import main

    _, tok = smollm
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tok))
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    out = str(tmp_path / "r.h5")
    assert main(["run", str(tmp_path / "m"), "--text", "hello world, this is a test", "-o", out]) == 0
    capsys.readouterr()
    assert main(["show", out, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)["research"]
    run = probe.load(out)
    for entry in data["sites"]:
        top = run[entry["site"]].topk
        assert [t["value"] for t in entry["topk"]] == top["value"][:5].tolist()
        assert [t["text"] for t in entry["topk"]] == [tok.decode([int(i)]) for i in top["token"][:5]]


def test_cosine_histogram_of_consecutive_sites(tiny):
    model = tiny("llama")
    batches = [_batch(6), _batch(7, b=2, t=9)]
    with probe.capture(model, skip_first=1, stats=NAMES) as run:
        for ids, mask in batches:
            model(input_ids=ids, attention_mask=mask)
    hs, meta = _reference(model, batches, 1)
    keep = meta["keep"]
    hist = run.cross.cos_hist
    assert hist.shape == (len(hs) - 1, 2 ** 12)
    bound = 2.0**-4 / (2 + 2.0**-4)
    for j in range(len(hs) - 1):
        a, b = hs[j][keep], hs[j + 1][keep]
        cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        assert hist[j].sum() == keep.sum()
        for q in (0.0, 0.25, 0.5, 0.9, 1.0):
            exact = 1 - np.quantile(cos, q)
            got = 1 - run.cross.cos_quantile(q)[j]
            assert abs(got - exact) <= bound * exact + 1e-6, (j, q)


def test_cosines_are_opt_in(tiny):
    model = tiny("gpt2")
    ids, mask = _batch(8)
    with probe.capture(model) as run:
        model(input_ids=ids, attention_mask=mask)
    assert "cos" not in run.result.stats and run.cross.cos_n == 0
    with pytest.raises(probe.ProbeError, match="no 'cos' statistic"):  # not an all-NaN matrix
        run.cross.cos
    assert "cos" not in run.cross and run.cross.r2.shape == (3, 3)
    for view in ("cos_hist", "block_influence"):  # not captured reads one way: an error, not empty arrays
        with pytest.raises(probe.ProbeError, match="no 'cos' statistic"):
            getattr(run.cross, view)
    with pytest.raises(probe.ProbeError, match="'cos' is computed by the cross-layer statistic"):
        probe.capture(model, stats=("moments", "cos"))


def test_one_cross_site_stores_and_merges(tiny, tmp_path):
    model = tiny("gpt2")
    ids, mask = _batch(9)
    paths = []
    for seed in (1, 2):
        path = tmp_path / f"{seed}.h5"
        with probe.capture(model, out=path, sites=["transformer.h.0"], seed=seed, stats=NAMES):
            model(input_ids=ids, attention_mask=mask)
        paths.append(path)
    merged = probe.merge(paths, tmp_path / "m.h5")
    assert merged.cross.cos_hist.shape == (0, 2 ** 12) and merged.cross.cos_n == 2 * mask.sum()
    np.testing.assert_allclose(merged.cross.cos, [[1.0]], rtol=1e-12)
