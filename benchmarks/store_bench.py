#!/usr/bin/env python
"""What windows cost: commit time at ``every=1``, file size per window, and opening a long run.

The model is GPT-2 small's width (768) with 4 layers: 5 sites (``hidden_states.0..4``), every
statistic at its default options (histogram m=7, 20,000-element sample, 4,096 positions).

    python benchmarks/store_bench.py commit              # commit cost per window at every=1
    python benchmarks/store_bench.py load --windows 1000 # write a 1,000-window run, then open it
    python benchmarks/store_bench.py all --json out.json

``commit`` times, for one batch: plain forwards (before and after the capture), forwards under
``probe.capture(out=...)`` and, after each, ``run.snapshot()``: one committed window, as
``every=1`` does after every forward (medians of the repeats).

``load`` writes a run of N windows (four real windows of one small forward each, appended in
turn through the file writer, as ``every=1`` would), then, in a fresh process, measures ``probe.load`` plus ``std`` and ``quantile(0.999)`` of every site: wall time
and the growth of the process's resident memory (``ru_maxrss`` after the imports vs. after the
reads). Runs on schema-1 and schema-2 versions of probe (it uses ``capture``, ``snapshot``,
``load`` and ``store.Writer.append``), so point ``PYTHONPATH`` at an older checkout to compare.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time


def _model():
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=4, n_embd=768, n_head=12, n_positions=1024, vocab_size=50257)
    return transformers.GPT2Model(cfg).eval()


def bench_commit(batch: int, seq: int, repeats: int, threads: int) -> dict:
    import torch

    import probe

    torch.set_num_threads(threads)
    model = _model()
    ids = torch.randint(0, 50257, (batch, seq), generator=torch.Generator().manual_seed(1))
    times: dict[str, list[float]] = {"plain": [], "capture": [], "commit": []}
    out = os.path.join(tempfile.mkdtemp(), "commit.h5")

    def plain():
        for _ in range(repeats):
            t = time.perf_counter()
            model(input_ids=ids)
            times["plain"].append(time.perf_counter() - t)

    with torch.no_grad():
        model(input_ids=ids)  # warm-up
        plain()
        with probe.capture(model, out, seed=0, overwrite=True) as run:
            model(input_ids=ids)
            run.snapshot()  # warm-up: the first window creates the datasets
            for _ in range(repeats):
                t = time.perf_counter()
                model(input_ids=ids)
                times["capture"].append(time.perf_counter() - t)
                t = time.perf_counter()
                run.snapshot()
                times["commit"].append(time.perf_counter() - t)
        plain()
        windows = len(run.steps)
    size = os.path.getsize(out)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "shape": f"{batch}x{seq}", "repeats": repeats, "threads": threads,
        "plain_ms": 1e3 * med["plain"], "capture_ms": 1e3 * med["capture"], "commit_ms": 1e3 * med["commit"],
        "commit_over_plain": med["commit"] / med["plain"],
        "windows": windows, "file_bytes": size, "bytes_per_window": size / windows,
    }


def write_run(path: str, windows: int, distinct: int = 4) -> float:
    """A run of ``windows`` windows: ``distinct`` real windows (one forward of 1x16 tokens each),
    appended in turn under labels 1..windows through the file writer (so the file is what
    ``every=1`` writes, without paying for the forwards)."""
    import torch

    import probe
    from probe import store

    torch.set_num_threads(2)
    model = _model()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad(), probe.capture(model, every=1, seed=0) as c:
        for _ in range(distinct):
            model(input_ids=torch.randint(0, 50257, (1, 16), generator=g))
    meta = c.meta() if callable(c.meta) else c.meta  # a method before schema 2
    rows = list(c._rows)
    t = time.perf_counter()
    writer = store.Writer(path, overwrite=True)
    for i in range(windows):
        writer.append(meta, dict(rows[i % distinct], step=i + 1))
    return time.perf_counter() - t


def _rss_mb() -> tuple[float, float]:
    """(current, peak) resident set size of this process in MB (Linux /proc; else ru_maxrss)."""
    try:
        with open("/proc/self/status") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024
    except (OSError, KeyError, ValueError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return peak, peak


def read_run(path: str) -> dict:
    """In a fresh process: the cost of opening a run and reading every site's std and quantile."""
    import numpy  # noqa: F401  (imports are not the reads' cost)

    import probe

    try:  # reset the peak RSS so it measures the reads alone (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    rss0, _ = _rss_mb()
    t = time.perf_counter()
    run = probe.load(path)
    values = [(run[name].std, run[name].quantile(0.999)) for name in run.sites]
    wall = time.perf_counter() - t
    rss1, peak = _rss_mb()
    return {"load_std_quantile_s": wall, "extra_rss_mb": rss1 - rss0, "extra_peak_rss_mb": peak - rss0,
            "sites": len(values), "windows": len(run.steps)}


def bench_load(windows: int, folder: str | None) -> dict:
    folder = folder or tempfile.mkdtemp()
    path = os.path.join(folder, f"long{windows}.h5")
    write_s = write_run(path, windows)
    child = subprocess.run([sys.executable, __file__, "_read", path], capture_output=True, text=True, check=True)
    out = json.loads(child.stdout.strip().splitlines()[-1])
    size = os.path.getsize(path)
    out.update({"write_s": write_s, "file_bytes": size, "bytes_per_window": size / windows})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["commit", "load", "all", "_read"])
    p.add_argument("path", nargs="?")
    p.add_argument("--windows", type=int, default=1000)
    p.add_argument("--shape", default="4x128", help="batch x sequence of the commit benchmark")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--folder", default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.what == "_read":
        print(json.dumps(read_run(args.path)))
        return
    import probe

    results: dict = {"probe": probe.__version__, "python": sys.version.split()[0]}
    if args.what in ("commit", "all"):
        b, s = (int(v) for v in args.shape.split("x"))
        results["commit"] = r = bench_commit(b, s, args.repeats, args.threads)
        print(f"commit at every=1, {r['shape']}: plain forward {r['plain_ms']:.1f} ms, forward under capture "
              f"{r['capture_ms']:.1f} ms, commit {r['commit_ms']:.1f} ms ({r['commit_over_plain']:.2f}x plain); "
              f"{r['bytes_per_window'] / 1e6:.2f} MB per window")
    if args.what in ("load", "all"):
        results["load"] = r = bench_load(args.windows, args.folder)
        print(f"{r['windows']} windows: file {r['file_bytes'] / 1e6:.1f} MB ({r['bytes_per_window'] / 1e3:.0f} kB "
              f"per window), appended in {r['write_s']:.1f} s; load + std + quantile of {r['sites']} sites: "
              f"{r['load_std_quantile_s']:.3f} s, {r['extra_rss_mb']:.1f} MB extra RSS "
              f"({r['extra_peak_rss_mb']:.1f} MB at the peak)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
