#!/usr/bin/env python
"""Overhead of probe against a plain forward, output_hidden_states, TransformerLens and nnsight.

Every (model, shape, method) cell runs in its own fresh subprocess, so each peak-RSS number
belongs to one method alone. Inside a child every timed method batch is paired with a timed plain
forward of the same model on the same batch, in alternating order (ABBA), and ``x plain`` is the
median of these pairs' ratios, so load drifts and order effects on a shared machine cancel out.

    python benchmarks/bench.py                  # the full CPU benchmark (tens of minutes on 2 cores)
    python benchmarks/bench.py --quick          # a smoke run: 4x256 only, fewer pairs
    python benchmarks/bench.py --methods plain,probe,probe_moments --json out.json
    python benchmarks/bench.py --profile        # where probe's overhead goes, by statistic
    python benchmarks/bench.py --parity --device cuda --dtype bfloat16 --arch llama-tiny

Workloads, in one process, settled to a confidence interval (see benchmarks/workloads.py):

    python benchmarks/bench.py --workload all              # gpt2, smollm2, generate, calibration, entry
    python benchmarks/bench.py --workload generate --half-width 0.02 --max-pairs 60

Each prints ``<workload>: plain <s>, probe <s>, x plain <median> (95% CI lo-hi, n pairs; settled)``:
the median of interleaved (plain, probe) pair ratios and its distribution-free order-statistic
interval; pairs are added until the interval is within +-half-width of the median, or the line
says NOT SETTLED (the exit code is then 1). ``entry`` prints seconds, not a ratio.

See benchmarks/README.md for what each column means.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import importlib
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# --------------------------------------------------------------------------------- methods
PROBE_NOCROSS = ("moments", "position", "histogram", "sample", "topk", "norm")
METHODS: dict[str, str] = {
    "plain": "plain forward (the floor)",
    "hidden_states": "output_hidden_states=True + torch stats",
    "probe": "probe, default stats (all 7)",
    "probe_nocross": "probe, all but cross",
    "probe_every25": "probe, default stats, 1 forward in 25 (schedule=)",
    "probe_eager": "probe, default stats, fused Triton kernel off",
    "probe_moments": "probe, moments only",
    "probe_position": "probe, position only",
    "probe_histogram": "probe, histogram only",
    "probe_sample": "probe, sample only",
    "probe_cross": "probe, cross only",
    "tl_forward": "TransformerLens forward (no cache)",
    "tl_cache": "TransformerLens run_with_cache",
    "nnsight": "nnsight, .save() every block output",
}
DEPTH_METHODS = ("plain", "hidden_states", "probe_nocross")
#: forwards per timed batch: a schedule's whole period, so every method batch holds exactly one
#: recorded forward and 24 skipped ones, and its plain partner the same 25 plain forwards
PERIOD = {"probe_every25": 25}
NEEDS = {"tl_forward": "transformer_lens", "tl_cache": "transformer_lens", "nnsight": "nnsight"}


def probe_stats(method: str):
    """The ``stats=`` argument of a probe method (``None`` = probe's default, every statistic)."""
    if method in ("probe", "probe_every25", "probe_eager"):
        return None
    if method == "probe_nocross":
        return PROBE_NOCROSS
    return (method.removeprefix("probe_"),)


# ------------------------------------------------------------------------------ model shapes
ARCHS = {
    # GPT-2 small: 768 wide, 12 heads, vocab 50257 (layers set by --layers / --depth)
    "gpt2": dict(default_layers=12, depth=(6, 12, 24)),
    # Llama-3.2-1B-shaped with a 32k vocab: 16 x (2048 wide, 8192 MLP, 32 heads, 8 KV heads) ~ 1.0B
    "llama": dict(default_layers=16, depth=(8, 16, 32)),
    # a small Llama for the parity check and quick tests
    "llama-tiny": dict(default_layers=4, depth=(2, 4, 8)),
}
LLAMA = {
    "llama": dict(hidden=2048, inter=8192, heads=32, kv=8, vocab=32000),
    "llama-tiny": dict(hidden=256, inter=688, heads=8, kv=4, vocab=32000),
}


def vocab_size(arch: str) -> int:
    return 50257 if arch == "gpt2" else LLAMA[arch]["vocab"]


def build_hf(arch: str, layers: int, device: str, dtype):
    import torch
    import transformers

    torch.manual_seed(0)
    if arch == "gpt2":
        config = transformers.GPT2Config(n_layer=layers, n_embd=768, n_head=12, n_positions=1024)
        cls = transformers.GPT2LMHeadModel
    else:
        s = LLAMA[arch]
        config = transformers.LlamaConfig(
            hidden_size=s["hidden"], intermediate_size=s["inter"], num_hidden_layers=layers,
            num_attention_heads=s["heads"], num_key_value_heads=s["kv"], vocab_size=s["vocab"],
            max_position_embeddings=8192, tie_word_embeddings=True, rms_norm_eps=1e-5)
        cls = transformers.LlamaForCausalLM
    with torch.device(device):
        model = cls(config)
    return model.to(dtype=dtype).eval()


def build_tl(arch: str, layers: int, device: str, dtype, seq: int = 0):
    import torch
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    if arch == "gpt2":
        cfg = HookedTransformerConfig(
            n_layers=layers, d_model=768, n_heads=12, d_head=64, d_mlp=3072, n_ctx=1024, d_vocab=50257,
            act_fn="gelu_new", normalization_type="LN", positional_embedding_type="standard",
            device=device, dtype=dtype, seed=0)
    else:
        s = LLAMA[arch]
        cfg = HookedTransformerConfig(
            n_layers=layers, d_model=s["hidden"], n_heads=s["heads"], d_head=s["hidden"] // s["heads"],
            d_mlp=s["inter"], n_key_value_heads=s["kv"], n_ctx=max(2048, seq), d_vocab=s["vocab"], act_fn="silu",
            normalization_type="RMS", positional_embedding_type="rotary",
            rotary_dim=s["hidden"] // s["heads"], gated_mlp=True, final_rms=True, eps=1e-5,
            original_architecture="LlamaForCausalLM", device=device, dtype=dtype, seed=0)
    with torch.device(device):
        model = HookedTransformer(cfg)
    return model.to(dtype).eval()


def block_path(arch: str) -> tuple[str, ...]:
    return ("transformer", "h") if arch == "gpt2" else ("model", "layers")


# ------------------------------------------------------------------------------ memory
def _proc_status_mib(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def rss_mib() -> float:
    value = _proc_status_mib("VmRSS")
    if value is not None:
        return value
    import psutil  # not Linux: psutil is in benchmarks/requirements.txt

    return psutil.Process().memory_info().rss / 2**20


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (Linux >= 4.0); ``False`` where it cannot be reset."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def trim() -> None:
    """Hand freed heap pages back to the OS (glibc), so RSS reflects live memory."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_mib() -> float:
    value = _proc_status_mib("VmHWM")
    if value is not None:
        return value
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


# ------------------------------------------------------------------------------- the child
class Runner:
    """One method on one model and batch: ``open()``, ``step()`` per batch, ``close()``."""

    def __init__(self, spec: dict) -> None:
        import torch

        self.spec = spec
        self.method = spec["method"]
        self.device = spec["device"]
        self.dtype = getattr(torch, spec["dtype"])
        arch, layers = spec["arch"], spec["layers"]
        b, t = spec["batch"], spec["seq"]
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, vocab_size(arch), (b, t), generator=g).to(self.device)
        self.mask = torch.ones_like(self.ids)
        self.model = build_hf(arch, layers, self.device, self.dtype)
        self.n_params = sum(p.numel() for p in self.model.parameters())
        self.other = None
        # the plain forwards timed beside the method run on this model: a copy where the method
        # attaches to the model (probe's hooks, nnsight's dispatchers), so the method can stay
        # attached across all its batches (steady state) while plain batches run hook-free
        self.floor = self.model
        if self.method.startswith("probe"):
            import copy

            self.floor = copy.deepcopy(self.model)
        if self.method.startswith("tl_"):
            self.other = build_tl(arch, layers, self.device, self.dtype, t)
        elif self.method == "nnsight":
            import copy

            from nnsight import NNsight

            # nnsight swaps every module's forward for its own dispatcher: it wraps a copy
            self.other = NNsight(copy.deepcopy(self.model))
            self.blocks = self.other
            for name in block_path(arch):
                self.blocks = getattr(self.blocks, name)
            self.n_blocks = layers
        self.capture = None
        self.sink: list = []
        self.period = PERIOD.get(self.method, 1)

    def plain(self) -> None:
        for _ in range(self.period):
            self.floor(input_ids=self.ids, attention_mask=self.mask)

    def open(self) -> None:
        if self.method.startswith("probe"):
            import probe
            from probe.capture import kernels

            kernels._OFF = self.method == "probe_eager"
            period = self.period
            schedule = None if period == 1 else (lambda i: i % period == 0)
            self.capture = probe.capture(self.model, stats=probe_stats(self.method), skip_first=1,
                                         schedule=schedule)
            self.capture.__enter__()

    def close(self) -> None:
        if self.capture is not None:
            self.capture.__exit__(None, None, None)
            self.capture = None
        self.sink.clear()

    def step(self) -> None:
        import torch

        m = self.method
        if m == "plain" or m.startswith("probe"):
            for _ in range(self.period):
                self.model(input_ids=self.ids, attention_mask=self.mask)
        elif m == "hidden_states":
            out = self.model(input_ids=self.ids, attention_mask=self.mask, output_hidden_states=True)
            per_layer = []
            for h in out.hidden_states:
                x = h.reshape(-1, h.shape[-1]).float()  # no copy when already float32
                std, mean = torch.std_mean(x, dim=0)
                per_layer.append((mean, std, x.amin(0), x.amax(0), x.abs().amax(), torch.histc(x, bins=256)))
            self.sink.append(per_layer)  # per-batch results are small; dropped at close()
        elif m == "tl_forward":
            self.other(self.ids)
        elif m == "tl_cache":
            _, cache = self.other.run_with_cache(self.ids)
            del cache
        elif m == "nnsight":
            self._nnsight_step()
        else:
            raise SystemExit(f"unknown method {m!r}")

    def _nnsight_step(self) -> list:
        saved = []
        with self.other.trace(input_ids=self.ids, attention_mask=self.mask):
            for i in range(self.n_blocks):
                saved.append(self.blocks[i].output.save())
        return saved


def child_main(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    cuda = spec["device"].startswith("cuda")

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def timed(fn) -> tuple[float, float]:
        """(wall seconds, process CPU seconds summed over threads) of one call."""
        sync()
        start, cpu = time.perf_counter(), time.process_time()
        fn()
        sync()
        return time.perf_counter() - start, time.process_time() - cpu

    result: dict = {"spec": spec}
    with torch.no_grad():
        runner = Runner(spec)
        result["n_params"] = runner.n_params
        result["model_rss_mib"] = rss_mib()
        # warm-up: one plain forward (thread pools, kernels, allocator); the freed heap is handed back
        # and the base taken: the model's own memory. The method then opens once and stays open
        # (a capture accumulates over every batch, as in use); its first batch is timed apart.
        timed(runner.plain)
        trim()
        base = rss_mib()
        base_gpu = torch.cuda.memory_allocated() if cuda else 0
        result["base_rss_mib"] = base
        exact_peak = reset_peak()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        runner.open()
        first = timed(runner.step)[0]
        peaks = [peak_mib()]
        peaks_gpu = [torch.cuda.max_memory_allocated()] if cuda else []

        # pairs: one plain batch, then one method batch, so each ratio compares two neighbouring
        # batches and load drifts on a shared machine cancel out; the peak is read per method batch
        plain_t, meth_t, plain_cpu, meth_cpu = [], [], [], []
        def method_batch() -> None:
            nonlocal exact_peak
            exact_peak &= reset_peak()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            wall, cpu = timed(runner.step)
            meth_t.append(wall)
            meth_cpu.append(cpu)
            peaks.append(peak_mib())
            if cuda:
                peaks_gpu.append(torch.cuda.max_memory_allocated())

        # ABBA: the method runs second in even pairs and first in odd ones, so whatever favours
        # the first or the second batch of a pair (caches, clocks: the plain-vs-plain cell shows
        # ~5 % on a shared VM) cancels in the median instead of inflating every ratio
        for j in range(spec["pairs"]):
            if j % 2:
                method_batch()
            wall, cpu = timed(runner.plain)
            plain_t.append(wall)
            plain_cpu.append(cpu)
            if not j % 2:
                method_batch()
        close = timed(runner.close)[0]
        extra = max(peaks) - base
        extra_gpu = (max(peaks_gpu) - base_gpu) / 2**20 if cuda else None

    import probe

    pair_ratio = sorted(m / p for m, p in zip(meth_t, plain_t))
    result.update(
        plain_s=statistics.median(plain_t), method_s=statistics.median(meth_t),
        ratio=statistics.median(pair_ratio), pair_ratios=pair_ratio,
        cpu_ratio=statistics.median(m / p for m, p in zip(meth_cpu, plain_cpu)),
        plain_times=plain_t, method_times=meth_t, plain_cpu=plain_cpu, method_cpu=meth_cpu,
        first_s=first, close_s=close, extra_peak_mib=extra, peaks_mib=[p - base for p in peaks],
        extra_gpu_mib=extra_gpu, peak_exact=exact_peak, probe_file=probe.__file__,
    )
    return result


# ------------------------------------------------------------------------------ the parent
def package_fingerprint() -> tuple[str, str]:
    """(directory of the importable probe package, sha1 of its .py files)."""
    spec = importlib.util.find_spec("probe")
    if spec is None or spec.origin is None:
        raise SystemExit("probe is not importable; run `pip install -e .` in the repository root first")
    root = Path(spec.origin).parent
    h = hashlib.sha1()
    for f in sorted(root.rglob("*.py")):
        h.update(str(f.relative_to(root)).encode())
        h.update(f.read_bytes())
    return str(root), h.hexdigest()[:12]


def freeze_probe(root: str) -> str:
    """Copy the probe package aside so that edits made during a long run don't mix versions."""
    dest = Path(tempfile.mkdtemp(prefix="probe-bench-"))
    shutil.copytree(root, dest / "probe", ignore=shutil.ignore_patterns("__pycache__"))
    return str(dest)


def run_child(spec: dict, env: dict, timeout: float) -> dict:
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)],
                              capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"spec": spec, "error": f"timed out after {timeout:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            out = json.loads(line[7:])
            out["wall_s"] = time.perf_counter() - start
            return out
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-6:]
    return {"spec": spec, "error": f"exit {proc.returncode}: " + " | ".join(tail)}


def parse_shapes(text: str) -> list[tuple[int, int]]:
    shapes = []
    for part in text.split(","):
        b, _, t = part.strip().lower().partition("x")
        shapes.append((int(b), int(t)))
    return shapes


def fmt_shape(b: int, t: int) -> str:
    return f"{b}x{t}"


def print_table(title: str, headers: list[str], rows: list[list[str]], console) -> None:
    if console is not None:
        from rich.table import Table

        table = Table(title=title, title_justify="left")
        for i, h in enumerate(headers):
            table.add_column(h, justify="left" if i == 0 or h == "note" else "right")
        for r in rows:
            table.add_row(*r)
        console.print(table)
        return
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    print(f"\n{title}")
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))


def main_table(results: list[dict], shape, args, console) -> None:
    b, t = shape
    cells = {r["spec"]["method"]: r for r in results
             if (r["spec"]["batch"], r["spec"]["seq"]) == shape and r["spec"]["layers"] == args.layers}
    if not cells:
        return
    plain = cells.get("plain", {})
    plain_extra = plain.get("extra_peak_mib")
    cuda = args.device.startswith("cuda")
    headers = ["method", "s/batch", "x plain", "p25-p75", "x plain CPU", "extra peak RSS MiB", "vs plain MiB"]
    if cuda:
        headers += ["extra GPU MiB"]
    headers += ["1st batch s", "close s", "note"]
    rows = []
    for m in args.methods:
        r = cells.get(m)
        if r is None:
            continue
        if "error" in r or "skipped" in r:
            rows.append([METHODS[m]] + ["-"] * (len(headers) - 2) + [r.get("skipped") or r["error"][:120]])
            continue
        q = r["pair_ratios"]
        q1, q3 = (statistics.quantiles(q, n=4)[0::2] if len(q) > 1 else (q[0], q[0]))
        row = [METHODS[m], f"{r['method_s']:.3f}", f"{r['ratio']:.3f}", f"{q1:.3f}-{q3:.3f}",
               f"{r['cpu_ratio']:.2f}", f"{r['extra_peak_mib']:.0f}",
               f"{r['extra_peak_mib'] - plain_extra:+.0f}" if plain_extra is not None else "-"]
        if cuda:
            row.append(f"{r['extra_gpu_mib']:.0f}")
        note = "" if r.get("peak_exact", True) else "peak RSS not resettable: whole-process peak"
        row += [f"{r['first_s']:.3f}", f"{r['close_s']:.3f}", note]
        rows.append(row)
    n = next((r["n_params"] for r in cells.values() if "n_params" in r), 0)
    title = (f"{args.arch} {args.layers} layers ({n / 1e6:.0f}M params), batch x seq {b}x{t}, "
             f"{args.device} {args.dtype}, {args.threads} threads; medians of {args.pairs} (plain, method) pairs")
    print_table(title, headers, rows, console)


def depth_table(results: list[dict], args, console) -> None:
    shape = args.depth_shape
    rows = []
    cuda = args.device.startswith("cuda")
    key = "extra_gpu_mib" if cuda else "extra_peak_mib"
    for layers in args.depth:
        cells = {r["spec"]["method"]: r for r in results
                 if (r["spec"]["batch"], r["spec"]["seq"]) == shape and r["spec"]["layers"] == layers}
        ok = {m: r for m, r in cells.items() if "error" not in r and "skipped" not in r}

        def mem(m):
            return f"{ok[m][key]:.0f}" if m in ok else "-"

        def ratio(m):
            return f"{ok[m]['ratio']:.2f}" if m in ok else "-"

        hs_minus = (f"{ok['hidden_states'][key] - ok['plain'][key]:.0f}"
                    if "hidden_states" in ok and "plain" in ok else "-")
        pr_minus = (f"{ok['probe_nocross'][key] - ok['plain'][key]:.0f}"
                    if "probe_nocross" in ok and "plain" in ok else "-")
        rows.append([str(layers), mem("plain"), mem("hidden_states"), mem("probe_nocross"), hs_minus, pr_minus,
                     ratio("hidden_states"), ratio("probe_nocross")])
    what = "extra peak GPU MiB" if cuda else "extra peak RSS MiB"
    headers = ["layers", "plain", "hidden_states", "probe (no cross)", "hs - plain", "probe - plain",
               "hs x plain", "probe x plain"]
    title = (f"depth scan, {args.arch}, batch x seq {fmt_shape(*shape)}, {what} over the model's own "
             f"(probe without 'cross' vs output_hidden_states + torch stats)")
    print_table(title, headers, rows, console)


def parent_main(args) -> int:
    try:
        from rich.console import Console

        console = Console(width=200)
    except ImportError:  # pragma: no cover
        console = None

    root, fingerprint = package_fingerprint()
    env = dict(os.environ)
    if not args.no_freeze:
        frozen = freeze_probe(root)
        env["PYTHONPATH"] = frozen + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if args.device == "cpu":
        env["OMP_NUM_THREADS"] = str(args.threads)
        env["MKL_NUM_THREADS"] = str(args.threads)
    if args.malloc_mmap_threshold:
        # a fixed threshold turns off glibc's sliding one: every large temporary is its own mapping,
        # returned on free, so peak RSS follows live memory (cleaner memory columns; the extra page
        # faults slow many-temporary methods down, so time such runs apart)
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["TRANSFORMERS_VERBOSITY"] = "error"
    env["HF_HUB_OFFLINE"] = "1"

    jobs: list[dict] = []
    seen = set()

    def add(method, layers, shape, pairs):
        key = (method, layers, shape)
        if key in seen:
            return
        seen.add(key)
        jobs.append(dict(method=method, arch=args.arch, layers=layers, batch=shape[0], seq=shape[1],
                         device=args.device, dtype=args.dtype, threads=args.threads, pairs=pairs))

    for shape in args.shapes:
        for m in args.methods:
            add(m, args.layers, shape, args.pairs)
    if args.depth:
        for layers in args.depth:
            for m in DEPTH_METHODS:
                add(m, layers, args.depth_shape, args.depth_pairs)

    header = {
        "python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
        "probe_package": root, "probe_sha1": fingerprint, "frozen_copy": not args.no_freeze,
        "argv": sys.argv[1:], "loadavg_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    versions = {}
    for name in ("torch", "transformers", "transformer_lens", "nnsight", "probe"):
        try:
            from importlib.metadata import version

            versions[name] = version(name.replace("_", "-"))
        except Exception:
            versions[name] = None
    header["versions"] = versions
    print(f"probe bench: {len(jobs)} cells, each in its own process; probe {versions['probe']} "
          f"({root}, sha1 {fingerprint}{', frozen copy' if not args.no_freeze else ''}); torch "
          f"{versions['torch']}, transformers {versions['transformers']}, transformer-lens "
          f"{versions['transformer_lens']}, nnsight {versions['nnsight']}", flush=True)
    missing = {m: NEEDS[m] for m in args.methods if m in NEEDS and importlib.util.find_spec(NEEDS[m]) is None}
    for m, mod in missing.items():
        print(f"  skipping {m}: {mod} is not installed (pip install -r benchmarks/requirements.txt)", flush=True)

    results: list[dict] = []
    t0 = time.perf_counter()
    try:
        _run_jobs(jobs, missing, env, args, header, results, t0)
    except KeyboardInterrupt:
        print("\ninterrupted: tables below cover the cells finished so far", flush=True)
    finally:
        if not args.no_freeze:
            shutil.rmtree(frozen, ignore_errors=True)

    header["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    if args.json:
        _dump(args.json, header, results)
    print()
    for shape in args.shapes:
        main_table(results, shape, args, console)
    if args.depth:
        depth_table(results, args, console)
    if header["loadavg_start"]:
        print(f"load average at start {header['loadavg_start'][0]:.2f}, at end {header['loadavg_end'][0]:.2f} "
              f"(1 min; {os.cpu_count()} CPUs)")
    return 1 if any("error" in r for r in results) else 0


def _run_jobs(jobs, missing, env, args, header, results, t0) -> None:
    for i, spec in enumerate(jobs, 1):
        label = f"[{i}/{len(jobs)}] {spec['arch']} L{spec['layers']} {fmt_shape(spec['batch'], spec['seq'])} " \
                f"{spec['method']}"
        if spec["method"] in missing:
            r = {"spec": spec, "skipped": f"{missing[spec['method']]} not installed"}
        else:
            print(f"{label} ...", end=" ", flush=True)
            r = run_child(spec, env, args.timeout)
            if "error" in r:
                print(f"FAILED ({r['error'][:300]})", flush=True)
            else:
                print(f"{r['method_s']:.3f} s/batch, x{r['ratio']:.2f} plain, +{r['extra_peak_mib']:.0f} MiB peak "
                      f"({r['wall_s']:.0f} s, {time.perf_counter() - t0:.0f} s total)", flush=True)
        r["loadavg"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        results.append(r)
        if args.json:
            _dump(args.json, header, results)


def _dump(path: str, header: dict, results: list[dict]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"run": header, "results": results}, f, indent=1)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------- --profile
def profile_main(args) -> int:
    """One probe forward, broken down by statistic (wall clock) and by the torch ops it adds."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    import probe
    from probe import stats as st

    torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    dtype = getattr(torch, args.dtype)
    b, t = args.shapes[0]
    model = build_hf(args.arch, args.layers, args.device, dtype)
    ids = torch.randint(0, vocab_size(args.arch), (b, t)).to(args.device)
    mask = torch.ones_like(ids)
    stats = None if args.profile_stats == "default" else tuple(args.profile_stats.split(","))

    def sync():
        if cuda:
            torch.cuda.synchronize()

    spent: dict[str, float] = {}
    calls: dict[str, int] = {}
    patched = []

    def wrap(owner, attr, label):
        orig = getattr(owner, attr)

        def inner(*a, **k):
            sync()
            start = time.perf_counter()
            with record_function(f"probe.{label}"):
                out = orig(*a, **k)
            sync()
            spent[label] = spent.get(label, 0.0) + time.perf_counter() - start
            calls[label] = calls.get(label, 0) + 1
            return out

        setattr(owner, attr, inner)
        patched.append((owner, attr, orig))

    # the capture calls each statistic's class-level update_group (a batch of sites, or one)
    # and on CPU, per site, ``partial`` (the heavy part) then one batched ``fold`` per statistic
    kinds = {"moments": st.Moments, "position": st.Position, "histogram": st.Histogram, "sample": st.Sample,
             "topk": st.TopK, "norm": st.Norm}
    for label, cls in kinds.items():
        wrap(cls, "update_group", label)
        if "partial" in cls.__dict__ or "partial" in getattr(cls.__mro__[1], "__dict__", {}):
            wrap(cls, "partial", label + " (partial)")
            wrap(cls, "fold", label + " (fold)")
    wrap(st.Cross, "hold", "cross.hold")
    wrap(st.Cross, "finish", "cross.finish")
    wrap(importlib.import_module("probe.capture.tokens").TokenContext, "tokens", "tokens (mask/positions)")
    forwards_cls = importlib.import_module("probe.capture.forward").Forwards  # the hooks' entry points
    wrap(forwards_cls, "observe", "site hook (inclusive)")
    wrap(forwards_cls, "begin", "root pre-hook (inclusive)")
    wrap(forwards_cls, "end", "root post-hook (inclusive)")

    def fwd():
        model(input_ids=ids, attention_mask=mask)

    def forwards(n: int) -> list[float]:
        times = []
        for _ in range(n):
            sync()
            s = time.perf_counter()
            fwd()
            sync()
            times.append(time.perf_counter() - s)
        return times

    n = args.profile_repeats
    with torch.no_grad():
        fwd()
        plain = forwards(n)
        with probe.capture(model, stats=stats, skip_first=1):
            fwd()  # warm-up: lazy state allocation
            spent.clear()
            calls.clear()
            timed = forwards(n)
            per_fwd = {k: v / n for k, v in spent.items()}
            per_call = {k: v // n for k, v in calls.items()}
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
            with profile(activities=acts, profile_memory=True) as prof:
                fwd()
    for owner, attr, orig in patched:
        setattr(owner, attr, orig)

    # means, not medians: the per-part times are sums over the same n forwards
    p_med, m_med = statistics.mean(plain), statistics.mean(timed)
    hooks = sum(per_fwd.get(k, 0.0) for k in ("site hook (inclusive)", "root pre-hook (inclusive)",
                                               "root post-hook (inclusive)"))
    model_t = m_med - hooks
    print(f"{args.arch} {args.layers} layers, {b}x{t}, {args.device} {args.dtype}, {args.threads} threads, "
          f"stats={stats or 'default'}; means of {n} forwards:\n"
          f"  probe forward {m_med * 1e3:.0f} ms = model {model_t * 1e3:.0f} ms + inside probe's hooks "
          f"{hooks * 1e3:.0f} ms -> implied x{m_med / model_t:.2f} plain\n"
          f"  (plain forward timed before it: {p_med * 1e3:.0f} ms -> measured x{m_med / p_med:.2f}; the implied "
          f"ratio is immune to load drift between the two phases)")

    leaves = [k + p for k in kinds for p in ("", " (partial)", " (fold)")]
    leaves += ["cross.hold", "cross.finish", "tokens (mask/positions)"]
    # a site hook stages its tensor (and reads its tokens); the statistics run when the forward
    # ends, inside the root post-hook
    glue = per_fwd.get("site hook (inclusive)", 0.0) - per_fwd.get("tokens (mask/positions)", 0.0)
    other_root = (per_fwd.get("root pre-hook (inclusive)", 0.0) + per_fwd.get("root post-hook (inclusive)", 0.0)
                  - sum(per_fwd.get(k, 0.0) for k in leaves if k != "tokens (mask/positions)"))
    parts = [(k, per_fwd[k], str(per_call[k])) for k in leaves if k in per_fwd]
    parts += [("site hooks: checks, staging", glue, ""), ("root hooks, less the statistics", other_root, "")]
    rows = [[k, f"{v * 1e3:.1f}", c, f"{100 * v / max(hooks, 1e-12):.1f}", f"{100 * v / model_t:.1f}"]
            for k, v, c in sorted(parts, key=lambda kv: -kv[1])]
    rows.append(["total inside probe", f"{hooks * 1e3:.1f}", "", "100.0", f"{100 * hooks / model_t:.1f}"])
    try:
        from rich.console import Console

        console = Console(width=200)
    except ImportError:  # pragma: no cover
        console = None
    print_table("probe time per forward, by statistic (wall clock, summed over sites)",
                ["part", "ms/forward", "calls/forward", "% of probe", "% of model fwd"], rows, console)

    # torch ops attributed to the innermost probe.* scope that ran them
    events = prof.events()
    by_scope: dict[tuple[str, str], list[float]] = {}
    for e in events:
        if e.name.startswith("probe."):
            continue
        scope, parent = None, e.cpu_parent
        while parent is not None:
            if parent.name.startswith("probe.") and parent.name not in (
                    "probe.site hook (inclusive)", "probe.root pre-hook (inclusive)",
                    "probe.root post-hook (inclusive)"):
                scope = parent.name[6:]
                break
            if parent.name.startswith("probe."):
                scope = scope or parent.name[6:]
            parent = parent.cpu_parent
        if scope is None:
            continue
        acc = by_scope.setdefault((scope, e.name), [0.0, 0, 0, 0.0])
        acc[0] += e.self_cpu_time_total
        acc[1] += 1
        acc[2] += max(0, getattr(e, "self_cpu_memory_usage", 0) or 0)
        acc[3] += getattr(e, "self_device_time_total", 0.0) or 0.0
    top = sorted(by_scope.items(), key=lambda kv: -kv[1][0])[: args.profile_top]
    total = sum(v[0] for v in by_scope.values())
    scopes: dict[str, list[float]] = {}
    for (sc, _), v in by_scope.items():
        acc = scopes.setdefault(sc, [0.0, 0, 0, 0.0])
        for j in range(4):
            acc[j] += v[j]
    device_col = ["self GPU ms"] if cuda else []

    def gpu(v):
        return [f"{v[3] / 1e3:.2f}"] if cuda else []

    print_table("inside probe during one profiled forward, by statistic: self CPU time of its torch ops, "
                "their count, and the bytes their outputs allocated (temporaries included)",
                ["statistic", "self CPU ms", *device_col, "torch ops", "allocated MiB"],
                [[sc, f"{v[0] / 1e3:.1f}", *gpu(v), str(v[1]), f"{v[2] / 2**20:.0f}"]
                 for sc, v in sorted(scopes.items(), key=lambda kv: -kv[1][0])], console)
    print_table(f"top torch ops inside probe during one forward (self CPU time; {total / 1e3:.0f} ms in probe scopes)",
                ["statistic", "op", "self CPU ms", *device_col, "calls", "% of probe", "allocated MiB"],
                [[s, op, f"{v[0] / 1e3:.1f}", *gpu(v), str(v[1]), f"{100 * v[0] / max(total, 1e-9):.1f}",
                  f"{v[2] / 2**20:.0f}"]
                 for (s, op), v in top], console)
    if cuda:
        kernels = prof.key_averages()
        fwd_gpu = sum(getattr(k, "self_device_time_total", 0.0) for k in kernels)
        print(f"GPU time of the whole profiled forward (all kernels): {fwd_gpu / 1e3:.2f} ms; "
              f"probe's share: {sum(v[3] for v in scopes.values()) / 1e3:.2f} ms")
    if args.profile_trace:
        prof.export_chrome_trace(args.profile_trace)
        print(f"chrome trace written to {args.profile_trace}")
    return 0


# ----------------------------------------------------------------------------- --parity
def parity_main(args) -> int:
    """probe's per-layer mean/std/min/max against output_hidden_states of the same forward."""
    import numpy as np
    import torch

    import probe

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    b, t = args.shapes[0]
    model = build_hf(args.arch, args.layers, args.device, dtype)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, vocab_size(args.arch), (b, t), generator=g).to(args.device)
    mask = torch.ones_like(ids)
    if b > 1:  # left padding on one row, right padding on another: padding must enter no statistic
        mask[0, : t // 4] = 0
        mask[-1, -(t // 8):] = 0
    with torch.no_grad(), probe.capture(model, stats=("moments",), skip_first=0, strict=True) as run:
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    hs = out.hidden_states
    if len(run.sites) != len(hs):
        print(f"PARITY FAILED: probe has {len(run.sites)} sites, output_hidden_states {len(hs)}")
        return 1
    keep = mask.bool().reshape(-1).cpu()
    worst = dict(mean=0.0, std=0.0, min=0.0, max=0.0, site_mean=0.0, site_std=0.0)
    lines = []
    for name, h in zip(run.sites, hs):
        x = h.detach().reshape(-1, h.shape[-1]).to("cpu", torch.float64)[keep].numpy()
        ref = dict(mean=x.mean(0), std=x.std(0), min=x.min(0), max=x.max(0))
        ch = run[name].channel
        scale = np.maximum(ref["std"], 1e-30)
        err = {
            "mean": float(np.max(np.abs(ch.mean - ref["mean"]) / scale)),
            "std": float(np.max(np.abs(ch.std - ref["std"]) / scale)),
            "min": float(np.max(np.abs(ch.min - ref["min"]) / np.maximum(np.abs(ref["min"]), 1e-30))),
            "max": float(np.max(np.abs(ch.max - ref["max"]) / np.maximum(np.abs(ref["max"]), 1e-30))),
            "site_mean": abs(run[name].mean - x.mean()) / max(x.std(), 1e-30),
            "site_std": abs(run[name].std - x.std()) / max(x.std(), 1e-30),
        }
        for k, v in err.items():
            worst[k] = max(worst[k], v)
        lines.append(f"  {name:<18} dtype {run[name].dtype:<9} tokens {run[name].tokens:>6}  " +
                     "  ".join(f"{k} {v:.1e}" for k, v in err.items()))
    print(f"parity on {args.arch} {args.layers} layers, {b}x{t} with padding, {args.device} {args.dtype}: "
          "max relative error per layer (mean/std relative to the channel's std, min/max to |value|)")
    print("\n".join(lines))
    tol = dict(mean=1e-4, std=1e-4, min=0.0, max=0.0, site_mean=1e-4, site_std=1e-4)
    bad = {k: v for k, v in worst.items() if v > tol[k]}
    print("worst: " + ", ".join(f"{k} {v:.2e} (tol {tol[k]:.0e})" for k, v in worst.items()))
    # the same forward with every statistic, eager and compiled (the default off CPU), against
    # float64 moments of the kept tokens (skip_first=1): std relative, skew and kurtosis absolute
    from probe.stats import _base

    kept = (mask.bool() & (mask.cumsum(1) > 1)).reshape(-1).cpu()
    ref = []
    for h in hs:
        x = h.detach().reshape(-1, h.shape[-1]).to("cpu", torch.float64)[kept].numpy()
        c = x - x.mean(0)
        m2 = (c**2).mean(0)
        ref.append((np.sqrt(m2), (c**3).mean(0) / m2**1.5, (c**4).mean(0) / m2**2 - 3))
    for flag in (False, True):
        with torch.no_grad(), probe.capture(model, skip_first=1, compile=flag, strict=True) as r:
            model(input_ids=ids, attention_mask=mask)
        err = dict(std=0.0, skew=0.0, kurtosis=0.0)
        for name, (std, skew, kurt) in zip(r.sites, ref):
            ch = r[name].channel
            err["std"] = max(err["std"], float(np.max(np.abs(ch.std - std) / np.maximum(std, 1e-30))))
            err["skew"] = max(err["skew"], float(np.max(np.abs(ch.skew - skew))))
            err["kurtosis"] = max(err["kurtosis"], float(np.max(np.abs(ch.kurtosis - kurt))))
        label = "compiled" if flag else "eager"
        print(f"every statistic, {label:>8}: per-channel std {err['std']:.1e} (relative), skew {err['skew']:.1e}, "
              f"excess kurtosis {err['kurtosis']:.1e} (absolute) against float64"
              + (f"; graphs compiled {len(_base._COMPILED)}, fell back to eager {len(_base._EAGER)}" if flag else ""))
        for k, tol in (("std", 1e-5), ("skew", 1e-4), ("kurtosis", 1e-3)):
            if err[k] > tol:
                bad[f"{label} {k}"] = err[k]
        if flag and _base._EAGER:
            bad["compile fell back to eager"] = len(_base._EAGER)
    bad.update(fused_parity(model, ids, mask, args))
    if bad:
        print(f"PARITY FAILED: {bad}")
        return 1
    print("PARITY OK")
    return 0


def kernel_parity(device: str, interpret: bool) -> dict:
    """The fused kernel's partial results against its float64 torch reference, with the default
    blocks (``Plan()``, or ``kernels._PLAN``): bf16 and float32, odd sizes, padding, NaN/inf, a
    massive value, subnormals. Block counts, extremes, absmax location, non-finite counts and
    histograms must be equal; block moments close (float32 powers over ``sub`` tokens)."""
    import torch

    from probe.capture import kernels
    from probe.capture.kernels import _reference, _triton

    plan = kernels.Plan(**kernels._PLAN)
    shapes = [(2, 37, 48), (1, 5, 16)] if interpret else [(3, 1031, 2050), (2, 4096, 2048), (1, 7, 5)]
    bad, worst = {}, 0.0
    for dtype in (torch.bfloat16, torch.float32):
        for g, n, d in shapes:
            gen = torch.Generator().manual_seed(n)
            x = torch.randn(g, n, d, generator=gen) * torch.linspace(0.01, 4.0, d)
            if n > 9 and d > 5:
                x[:, 3, 1], x[:, 5, :3], x[:, 6, 2] = 300.0, 0.0, 1e-39
                x[0, 4, 0], x[0, 7, 3], x[-1, 8, 5] = float("nan"), float("inf"), float("-inf")
            x = x.to(device, dtype)
            keep = torch.rand(n, generator=gen).to(device) > 0.2
            got, want = _triton.partials(x, keep, plan), _reference.partials(x, keep, plan)
            label = f"kernel {str(dtype).replace('torch.', '')} {g}x{n}x{d}"
            for f in ("ext", "large", "best", "best_at", "bad", "hist", "lossy", "rowmax"):
                if not torch.equal(getattr(got, f), getattr(want, f)):
                    bad[f"{label} {f}"] = "differs"
            for a, b in ((got.mom[:, :, 0], want.mom[:, :, 0]), (got.tok[:, :, 0], want.tok[:, :, 0])):
                if not torch.equal(a, b):
                    bad[f"{label} counts"] = "differs"
            for k in (1, 2, 3, 4):
                scale = want.mom[:, :, 2].clamp(min=1e-300).pow(k / 2) / want.mom[:, :, 0].clamp(min=1).pow(k / 2 - 1)
                if k == 1:
                    scale = (want.mom[:, :, 2] / want.mom[:, :, 0].clamp(min=1)).sqrt().clamp(min=1e-300)
                err = float(((got.mom[:, :, k] - want.mom[:, :, k]).abs() / scale).nan_to_num(0.0).max())
                worst = max(worst, err)
                if err > 1e-4:
                    bad[f"{label} mom[{k}]"] = err
    print(f"fused kernel vs float64 torch reference on {device} ({plan}): exact fields "
          + ("equal" if not any(v == "differs" for v in bad.values()) else "DIFFER")
          + f"; block moments worst error {worst:.1e} (in units of the block's std ** k)")
    return bad


def fused_parity(model, ids, mask, args) -> dict:
    """On CUDA: the fused Triton path's states against the eager path's on the same forward
    (counts, extremes, absmax location, histograms, per-position counts exact; moments close)."""
    import numpy as np
    import torch

    import probe
    from probe.capture import kernels

    interpret = os.environ.get("TRITON_INTERPRET") == "1"  # CPU tensors through Triton's interpreter
    if not args.device.startswith("cuda") and not interpret:
        print("fused path: not checked (it runs on CUDA, or on CPU under TRITON_INTERPRET=1)")
        return {}
    if not kernels.available():
        print("fused path: triton is not installed (pip install 'probe[gpu]')")
        return {"fused path": "triton missing"}
    bad = kernel_parity(args.device, interpret)
    runs = {}
    kernels._FORCE = interpret
    for off in (False, True):
        kernels._OFF = off
        try:
            with torch.no_grad(), probe.capture(model, skip_first=1, compile=False, strict=True) as r:
                model(input_ids=ids, attention_mask=mask)
                model(input_ids=ids.flip(0), attention_mask=mask.flip(0))
        finally:
            kernels._OFF = False
        runs["eager" if off else "fused"] = r.result.total.sites
    if kernels._BROKEN is not None:
        print(f"fused path: FAILED to run: {kernels._BROKEN}")
        return {"fused path": kernels._BROKEN}
    exact = {"moments": ("n", "min", "max", "nan", "posinf", "neginf", "tokens", "absmax", "absmax_at", "large"),
             "histogram": ("counts", "lossless"), "position": ("tokens", "n", "absmax", "overflow")}
    close = {"moments": (("mean", 1e-12), ("m2", 1e-5), ("m3", 1e-3), ("m4", 1e-4)),
             "position": (("mean", 1e-12), ("m2", 1e-5))}
    worst = {}
    for site, per in runs["fused"].items():
        other = runs["eager"][site]
        for kind, fields in exact.items():
            for f in fields:
                if not np.array_equal(per[kind][f], other[kind][f]):
                    bad[f"fused {site} {kind}.{f}"] = "differs"
        for kind, fields in close.items():
            for f, tol in fields:
                a, b = per[kind][f], other[kind][f]
                scale = np.maximum(np.abs(b), 1e-300) if f != "mean" else np.maximum(np.abs(b), 1.0)
                if f in ("m3",):  # relative to M2 ** 1.5 (a skewness unit)
                    scale = np.maximum(per[kind]["m2"], 1e-300) ** 1.5 / np.maximum(per[kind]["n"], 1) ** 0.5
                err = float(np.max(np.abs(a - b) / scale))
                worst[f"{kind}.{f}"] = max(worst.get(f"{kind}.{f}", 0.0), err)
                if err > tol:
                    bad[f"fused {site} {kind}.{f}"] = err
    print("fused vs eager on " + args.device + ": exact fields " + ("equal" if not any(v == "differs" for v in bad.values())
                                                                    else "DIFFER") + "; worst relative: "
          + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()))
    return bad


# -------------------------------------------------------------------------------- CLI
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: 4x256 only, 1 round of 2 batches")
    ap.add_argument("--methods", default="all",
                    help=f"comma-separated subset of: {', '.join(METHODS)} (default: all)")
    ap.add_argument("--json", metavar="PATH", help="write every cell's measurements here (updated as it goes)")
    ap.add_argument("--arch", choices=list(ARCHS), default="gpt2",
                    help="gpt2: GPT-2 small shape; llama: ~1B Llama shape; llama-tiny: a small Llama")
    ap.add_argument("--layers", type=int, help="layers of the main tables (default: 12 gpt2, 16 llama)")
    ap.add_argument("--shapes", help="batch x seq list (default 4x256,8x512; --quick 4x256)")
    ap.add_argument("--depth", help="layer counts of the depth scan, e.g. 6,12,24 (default by arch); 'none' to skip")
    ap.add_argument("--depth-shape", help="batch x seq of the depth scan (default: the last shape)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in each child (default 2)")
    ap.add_argument("--pairs", type=int, help="timed (plain batch, method batch) pairs per cell (default 5; --quick 2)")
    ap.add_argument("--depth-pairs", type=int, help="pairs per depth-scan cell (default 2; --quick 1)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per cell before it is given up")
    ap.add_argument("--malloc-mmap-threshold", type=int, metavar="BYTES",
                    help="set glibc's MALLOC_MMAP_THRESHOLD_ in the children (e.g. 131072) for cleaner peak RSS")
    ap.add_argument("--no-freeze", action="store_true",
                    help="import probe from where it is installed instead of a copy taken at start")
    ap.add_argument("--profile", action="store_true", help="profile one probe forward instead of benchmarking")
    ap.add_argument("--profile-stats", default="default", help="stats for --profile, comma-separated or 'default'")
    ap.add_argument("--profile-repeats", type=int, default=3)
    ap.add_argument("--profile-top", type=int, default=25)
    ap.add_argument("--profile-trace", metavar="PATH", help="also write a chrome trace of the profiled forward")
    ap.add_argument("--parity", action="store_true",
                    help="check probe's per-layer mean/std/min/max against output_hidden_states and exit")
    ap.add_argument("--workload", metavar="NAMES",
                    help="gpt2, smollm2, generate, calibration, entry (comma-separated) or all: probe's cost "
                         "as users meet it, in one process, until the median ratio's 95%% interval is within "
                         "--half-width (see the module docstring); the bundled model is probe.models.load_model()")
    ap.add_argument("--half-width", type=float, default=0.02,
                    help="--workload: stop when the 95%% interval is within this of the median (default 0.02)")
    ap.add_argument("--min-pairs", type=int, default=8, help="--workload: at least this many pairs (default 8)")
    ap.add_argument("--max-pairs", type=int, default=60,
                    help="--workload: at most this many pairs, then NOT SETTLED (default 60)")
    ap.add_argument("--budget", type=float, default=1800,
                    help="--workload: seconds per workload before NOT SETTLED (default 1800)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child or args.workload:
        return args
    arch = ARCHS[args.arch]
    args.layers = args.layers or arch["default_layers"]
    args.shapes = parse_shapes(args.shapes or ("4x256" if args.quick else "4x256,8x512"))
    args.depth_shape = parse_shapes(args.depth_shape)[0] if args.depth_shape else args.shapes[-1]
    if args.depth == "none":
        args.depth = []
    else:
        args.depth = [int(x) for x in args.depth.split(",")] if args.depth else list(arch["depth"])
    args.pairs = args.pairs or (2 if args.quick else 5)
    # the depth scan is about memory: two pairs give its peak and a rough time
    args.depth_pairs = args.depth_pairs or (1 if args.quick else 2)
    if args.methods == "all":
        args.methods = list(METHODS)
    else:
        args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        unknown = [m for m in args.methods if m not in METHODS]
        if unknown:
            ap.error(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            ap.error("--device cuda but torch.cuda.is_available() is False")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        import warnings

        warnings.filterwarnings("ignore")
        result = child_main(json.loads(args.child))
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    if args.workload:
        sys.path.insert(0, str(HERE))
        from workloads import workload_main

        return workload_main(args)
    if args.parity:
        return parity_main(args)
    if args.profile:
        return profile_main(args)
    return parent_main(args)


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
