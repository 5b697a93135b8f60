"""Exact merge of run files: ranks of one job, or shards of a dataset captured separately.

Files with the same list of steps merge window by window (a time series stays a time series);
otherwise all windows merge into one. A merge refuses only what cannot be merged: another model
(configuration), other sites, other statistics or statistic options; the message names exactly
the keys that differ. Runs that used the same sample seed merge too, with a warning: their
samples are then correlated, not independent (``capture`` draws a fresh seed per run unless
given one). A run given twice (the same object or the same file) is refused: it would double
every count. The merged run records the documents of all inputs (``meta["texts"]``).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import Any

from ..errors import ProbeError
from .run import Run, merge_rows

__all__ = ["merge_runs", "differences"]

_MUST_MATCH = ("stats", "skip_first", "max_positions", "histogram", "cross_sites")


def differences(a: Any, b: Any, prefix: str = "", limit: int = 4) -> list[str]:
    """``"key: a vs b"`` for each leaf where the JSON-like ``a`` and ``b`` differ.

    Args:
        a, b: JSON-like values (dicts, lists, scalars).
        prefix: the key path the lines start with.
        limit: the most lines returned.

    Returns:
        One line per differing leaf, at most ``limit``.

    Example:
        >>> differences({"skip_first": 0, "stats": ["moments"]}, {"skip_first": 1, "stats": ["moments"]})
        ['skip_first: 0 vs 1']
    """
    out: list[str] = []

    def walk(x, y, where):
        if len(out) >= limit:
            return
        if isinstance(x, dict) and isinstance(y, dict):
            for k in list(x) + [k for k in y if k not in x]:
                walk(x.get(k, "<absent>"), y.get(k, "<absent>"), f"{where}.{k}" if where else str(k))
        elif isinstance(x, list) and isinstance(y, list):
            if len(x) != len(y):
                out.append(f"{where or 'value'}: {len(x)} entries vs {len(y)}")
            for i, (u, v) in enumerate(zip(x, y)):
                walk(u, v, f"{where}[{i}]")
        elif x != y:
            out.append(f"{where or 'value'}: {_short(x)} vs {_short(y)}")

    walk(a, b, prefix)
    return out


def _short(value: Any, width: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 1] + "…"


def _model(meta: dict) -> dict:
    m = meta.get("model", {})
    return {"class": m.get("class"), "config": m.get("config", {})}


def _sites(meta: dict) -> list[dict]:
    return [{"name": s.get("name"), "module": s.get("module"), "read": s.get("read")}
            for s in meta.get("sites", [])]


def merge_runs(runs: Sequence[Run], names: Sequence[str] | None = None) -> Run:
    """Merge runs exactly (see the module docstring).

    Args:
        runs: two or more runs of the same model, sites, statistics and options.
        names: what the messages call each run (default: its path, or ``"run i"``).

    Returns:
        An in-memory :class:`Run`: counts add, moments merge by Chan / Pébay, extremes and
        top-k by max, samples by bottom-k of the keys, histograms add.

    Raises:
        ProbeError: fewer than two runs, a run given twice, or runs that differ in model, sites,
            statistics or their options (the message lists the differing keys).

    Example:
        >>> import warnings
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore")  # the same window twice: the same sample seed
        ...     both = merge_runs([run, run.at(1)])
        >>> both[0].tokens == 2 * run[0].tokens, both[0].mean == run[0].mean
        (True, True)
        >>> merge_runs([run, run])
        Traceback (most recent call last):
        ...
        probe.errors.ProbeError: run 1 is the same run as run 0; expected distinct runs (merging a run with itself doubles every count); pass each file once
    """
    if len(runs) < 2:
        raise ProbeError(f"merge needs at least two runs; got {len(runs)}; pass two or more files")
    names = list(names or [r.path or f"run {i}" for i, r in enumerate(runs)])
    _refuse_repeats(runs, names)
    first = runs[0]
    from ..stats._state import SPECS

    unknown = [k for k in first.meta.get("stats") or [] if k not in SPECS and k != "cos"]
    if unknown:
        raise ProbeError(f"{names[0]} holds statistics {unknown} that this process has not registered; expected "
                         "every captured statistic registered, or its data would be dropped from the merge; call "
                         "probe.stats.register(<its class>) before merging")
    seeds: dict[Any, str] = {}
    for name, run in zip(names, runs):
        diff = differences(_sites(run.meta), _sites(first.meta), "sites")
        if diff:
            raise ProbeError(f"{name} captures other sites than {names[0]} ({'; '.join(diff)}); expected "
                             "identical sites; merge runs captured with the same sites=")
        diff = differences(_model(run.meta), _model(first.meta), "model")
        if diff:
            raise ProbeError(f"{name} comes from another model than {names[0]} ({'; '.join(diff)}); "
                             "expected the same model and configuration; compare them with probe diff instead")
        for key in _MUST_MATCH:
            diff = differences(run.meta.get(key), first.meta.get(key), key)
            if diff:
                raise ProbeError(f"{name} differs from {names[0]} in {key} ({'; '.join(diff)}); expected "
                                 "equal capture options; recapture with matching options")
        sample = run.meta.get("sample", {})
        for seed in sample.get("seeds") or [sample.get("seed")]:
            if "sample" in run.meta.get("stats", []) and seed is not None and seed in seeds:
                warnings.warn(f"probe: {name} and {seeds[seed]} used the same sample seed {seed}: their "
                              "samples are correlated, not independent, and if they hold the same data (a "
                              "copy of one file) every count is doubled; capture each with its own seed "
                              "(the default draws one)", stacklevel=2)
            seeds.setdefault(seed, name)
    cross = first.meta.get("cross_sites", [])
    if all(r.steps == first.steps for r in runs):
        rows = [merge_rows([r.rows[i] for r in runs], cross) for i in range(len(first.steps))]
    else:
        rows = [merge_rows([r.total for r in runs], cross)]  # each run's cumulative state
    meta = dict(first.meta)
    meta["merged_from"] = [os.path.basename(n) for n in names]
    meta["sample"] = dict(meta.get("sample", {}), seeds=sorted(s for s in seeds if s is not None))
    texts = {}
    for r in runs:
        texts.update(r.meta.get("token_text", {}))
    if texts:
        meta["token_text"] = texts
    if all(isinstance(r.meta.get("texts"), int) for r in runs):  # documents read, in all inputs
        meta["texts"] = sum(int(r.meta["texts"]) for r in runs)
    return Run(meta, rows)


def _refuse_repeats(runs: Sequence[Run], names: Sequence[str]) -> None:
    """Refuse a run given twice (the same object, or the same file under two names): merging it
    with itself would double every count."""
    for j, run in enumerate(runs):
        for i in range(j):
            other = runs[i]
            same = run is other
            if not same and run.path and other.path:
                try:
                    same = os.path.samefile(run.path, other.path)
                except OSError:
                    same = False
            if same:
                raise ProbeError(f"{names[j]} is the same run as {names[i]}; expected distinct runs (merging a "
                                 "run with itself doubles every count); pass each file once")
