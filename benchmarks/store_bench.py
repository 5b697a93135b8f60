#!/usr/bin/env python
"""What the run file costs: commit time per window, and opening and reading a long run.

The model is GPT-2 small's width (768) with 4 layers: 5 sites (``hidden_states.0..4``), every
statistic at its default options. Its windows are captured once, in memory
(``probe.capture(model)`` with ``run.snapshot()`` after each forward), and then appended through
:class:`probe.store.Writer`, the writer ``probe.capture(out=..., every=1)`` commits with, so the
numbers are the store's alone, without the forwards' cost.

    python benchmarks/store_bench.py commit --windows 40     # commit cost per window, by mode
    python benchmarks/store_bench.py load --windows 1000     # probe.load + read every window
    python benchmarks/store_bench.py all --json out.json

``commit`` appends the same windows to one file per mode, in turn (window i to every mode, in an
order that rotates, so drifting load hits every mode alike), and reports the median time of one
``Writer.append`` per mode and the ratios to the default:

- ``default``: each commit written by probe's writer process, ``fsync`` at the commit point;
- ``no-fsync``: in the writer process, without ``fsync`` (``PROBE_FSYNC=0``);
- ``inline``: written in this process, without ``fsync`` (``PROBE_COMMIT=inline PROBE_FSYNC=0``),
  how commits were written before the writer process;
- ``pipelined``: as ``default``, appended with ``wait=False`` as ``every=`` and schedule commits
  are: the time the host spends, the acknowledgement of the window before included (it arrived
  while the other modes were appending, as it does while the next forwards run).

``load`` writes a run of N windows (the captured windows relabelled 1..N), then times, in one
process and interleaved (A B B A ...), ``probe.load`` plus reading every window's records
(``run.rows``) and the cumulative ``std`` of every site, with the validation of
every record on (as always) and with :func:`probe.store.schema.validate` and ``check`` replaced by
no-ops: probe has no switch to turn validation off, so the second figure is an estimate of what
validation costs, made by patching the reader's internals in this benchmark only (Fletcher-32 is
HDF5's and stays on).

Timings are wall-clock on whatever cores the machine shares: on a loaded machine they are noisy;
the ratios, measured in one process and interleaved, are the figures to compare.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time

MODES = {"default": {}, "no-fsync": {"fsync": False}, "inline": {"isolate": False, "fsync": False}}
#: modes whose appends return before the writer process acknowledges (what ``every=`` commits do)
PIPELINED = {"pipelined": {}}


def _model():
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=4, n_embd=768, n_head=12, n_positions=1024, vocab_size=50257)
    return transformers.GPT2Model(cfg).eval()


def windows(distinct: int, batch: int, seq: int, threads: int):
    """``distinct`` real windows (one forward of ``batch`` x ``seq`` tokens each) and the run's
    description, captured in memory."""
    import torch

    import probe

    torch.set_num_threads(threads)
    model = _model()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad(), probe.capture(model, seed=0) as run:
        for _ in range(distinct):
            model(input_ids=torch.randint(0, 50257, (batch, seq), generator=g))
            run.snapshot()
    return run.meta, list(run.rows)


def _relabel(row, step: int):
    return dataclasses.replace(row, step=step)


def bench_commit(n: int, batch: int, seq: int, threads: int, folder: str) -> dict:
    from probe import store

    meta, rows = windows(4, batch, seq, threads)
    modes = {**MODES, **PIPELINED}
    writers = {m: store.Writer(os.path.join(folder, f"commit-{m}.h5"), overwrite=True, **kw)
               for m, kw in modes.items()}
    times: dict[str, list[float]] = {m: [] for m in modes}
    order = list(modes)
    try:
        for i in range(n + 1):
            row = _relabel(rows[i % len(rows)], i + 1)
            for m in order[i % len(order):] + order[:i % len(order)]:
                t = time.perf_counter()
                writers[m].append(meta, row, wait=m not in PIPELINED)
                if i:  # the first window creates the datasets: a warm-up
                    times[m].append(time.perf_counter() - t)
    finally:
        for w in writers.values():
            w.close()
    med = {m: statistics.median(v) for m, v in times.items()}
    size = os.path.getsize(writers["default"].path)
    return {"windows": n, "shape": f"{batch}x{seq}", "threads": threads,
            "commit_ms": {m: 1e3 * v for m, v in med.items()},
            "commit_ms_p25_p75": {m: [1e3 * q for q in statistics.quantiles(v, n=4)[::2]] for m, v in times.items()},
            "ratio_to_inline": {m: med[m] / med["inline"] for m in modes},
            "bytes_per_window": size / (n + 1)}


def write_run(path: str, n: int, batch: int, seq: int, threads: int) -> float:
    """A run of ``n`` windows appended through :class:`probe.store.Writer`; seconds taken."""
    from probe import store

    meta, rows = windows(4, batch, seq, threads)
    t = time.perf_counter()
    w = store.Writer(path, overwrite=True)
    try:
        for i in range(n):
            w.append(meta, _relabel(rows[i % len(rows)], i + 1))
    finally:
        w.close()
    return time.perf_counter() - t


def _read_everything(path: str) -> float:
    import probe

    t = time.perf_counter()
    run = probe.load(path)
    for _ in run.rows:  # each window read (and checked)
        pass
    for name in run.sites:
        _ = run[name].std
    return time.perf_counter() - t


def bench_load(n: int, repeats: int, batch: int, seq: int, threads: int, folder: str) -> dict:
    from probe.store import reader, schema

    path = os.path.join(folder, f"long{n}.h5")
    write_s = write_run(path, n, batch, seq, threads)
    real = (reader.validate, reader.check)

    def unchecked(on: bool) -> None:
        reader.validate, reader.check = real if on else (lambda kind, state, where: state, lambda ds: None)

    times: dict[str, list[float]] = {"validated": [], "unvalidated": []}
    try:
        for i in range(repeats):
            for on in ((True, False) if i % 2 == 0 else (False, True)):
                unchecked(on)
                times["validated" if on else "unvalidated"].append(_read_everything(path))
    finally:
        unchecked(True)
    assert schema.validate is real[0]
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"windows": n, "repeats": repeats, "write_s": write_s, "file_bytes": os.path.getsize(path),
            "load_read_s": med, "validated_over_unvalidated": med["validated"] / med["unvalidated"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["commit", "load", "all"])
    p.add_argument("--windows", type=int, default=None, help="windows (default: commit 40, load 1000)")
    p.add_argument("--repeats", type=int, default=4, help="load: reads of the whole file per setting")
    p.add_argument("--shape", default="1x128", help="batch x sequence of each captured window's forward")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--folder", default=None, help="where the files go (default: a new temp folder)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    import probe

    folder = args.folder or tempfile.mkdtemp()
    b, s = (int(v) for v in args.shape.split("x"))
    results: dict = {"probe": probe.__version__, "python": sys.version.split()[0], "load_average": os.getloadavg()}
    if args.what in ("commit", "all"):
        results["commit"] = r = bench_commit(args.windows or 40, b, s, args.threads, folder)
        print(f"commit of one window ({r['windows']} windows, {r['bytes_per_window'] / 1e6:.2f} MB each): "
              + ", ".join(f"{m} {ms:.1f} ms ({r['ratio_to_inline'][m]:.2f}x inline)"
                          for m, ms in r["commit_ms"].items()))
    if args.what in ("load", "all"):
        results["load"] = r = bench_load(args.windows or 1000, args.repeats, b, s, args.threads, folder)
        print(f"{r['windows']} windows ({r['file_bytes'] / 1e6:.1f} MB, appended in {r['write_s']:.1f} s): "
              f"probe.load + every window + std: {r['load_read_s']['validated']:.2f} s validated, "
              f"{r['load_read_s']['unvalidated']:.2f} s with validation patched out "
              f"({r['validated_over_unvalidated']:.3f}x)")
    print(f"load average {results['load_average'][0]:.1f}: timings on shared cores are noisy; compare the ratios")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
