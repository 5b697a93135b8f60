"""Exact merge of run files: ranks of one job, or shards of a dataset captured separately.

Files with the same list of steps merge window by window (a time series stays a time series);
otherwise all windows merge into one. Files must agree on model, sites, statistics and their
options, and must use different sample seeds (identical seeds would draw correlated samples).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from .errors import ProbeError
from .run import Run, merge_rows

__all__ = ["merge_runs", "merge_files"]

_MUST_MATCH = ("stats", "skip_first", "max_positions", "histogram", "cross_sites")


def merge_runs(runs: Sequence[Run], names: Sequence[str] | None = None) -> Run:
    if len(runs) < 2:
        raise ProbeError(f"merge needs at least two runs; got {len(runs)}; pass two or more files")
    names = list(names or [r.path or f"run {i}" for i, r in enumerate(runs)])
    first = runs[0]
    seeds = {}
    for name, run in zip(names, runs):
        if [s["name"] for s in run.meta.get("sites", [])] != first.sites:
            raise ProbeError(f"{name} captures other sites than {names[0]}; expected identical sites; "
                             "merge runs captured with the same sites=")
        a, b = run.meta.get("model", {}), first.meta.get("model", {})
        if (a.get("class"), a.get("config")) != (b.get("class"), b.get("config")):
            raise ProbeError(f"{name} comes from another model than {names[0]} ({a.get('class')} vs {b.get('class')}); "
                             "expected the same model; compare them with probe diff instead")
        for key in _MUST_MATCH:
            if run.meta.get(key) != first.meta.get(key):
                raise ProbeError(f"{name} differs from {names[0]} in {key} ({run.meta.get(key)!r} vs "
                                 f"{first.meta.get(key)!r}); expected equal capture options; recapture with matching options")
        seed = run.meta.get("sample", {}).get("seed")
        if "sample" in run.meta.get("stats", []) and seed in seeds:
            raise ProbeError(f"{name} and {seeds[seed]} used the same sample seed {seed}; expected a different "
                             "seed per file so samples are independent; capture each shard with its own seed=")
        seeds[seed] = name
    cross = first.meta.get("cross_sites", [])
    if all(r.steps == first.steps for r in runs):
        rows = [merge_rows([r.rows[i] for r in runs], cross) for i in range(len(first.rows))]
    else:
        rows = [merge_rows([row for r in runs for row in r.rows], cross)]
    meta = dict(first.meta)
    meta["merged_from"] = [os.path.basename(n) for n in names]
    meta["sample"] = dict(meta.get("sample", {}), seeds=sorted(s for s in seeds if s is not None))
    texts = {}
    for r in runs:
        texts.update(r.meta.get("token_text", {}))
    if texts:
        meta["token_text"] = texts
    return Run(meta, rows)


def merge_files(paths: Sequence[str], out: str, *, overwrite: bool = False) -> Run:
    """Merge the run files ``paths`` into ``out`` and return the merged run."""
    from .store import check_writable, read, write_run

    check_writable(out, overwrite)
    runs = [read(p) for p in paths]
    merged = merge_runs(runs, [os.fspath(p) for p in paths])
    write_run(merged, out, overwrite)
    return read(out)
