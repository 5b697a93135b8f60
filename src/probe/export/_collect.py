"""Per-module calibration statistics of a linear layer's input, gathered from one or more runs.

Everything is read through the public Run API (``run.sites``, ``run.meta``, ``run[site]``): the
per-channel ``count``, ``mean``, ``var``, ``min`` and ``max`` and the site's ``tokens``. The sums
the consumers want are rebuilt from the channel moments in float64:

- ``sum_x2[d] = count[d] · (var[d] + mean[d]²)`` (``var`` is the population variance ``M2 / n``,
  so this is ``M2 + n · mean²``, the raw second moment sum);
- ``sum_x[d] = count[d] · mean[d]``;
- ``absmax[d] = max(|min[d]|, |max[d]|)``, exact (float32 extremes).

Several runs are combined exactly as ``probe.merge`` would: sums and counts add, maxima take the
maximum, histogram counts add.

Mixture-of-experts layers (``"<experts>:experts"`` sites, :mod:`probe.capture.moe`) give one
:class:`ExpertStats` per experts module: the same sums per expert, ``[E, D]``, and the real tokens
routed to each expert, ``[E]`` (:func:`collect_experts`); :func:`coverage` says which experts saw
no or few tokens.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field

import numpy as np

from ..errors import ProbeError
from ..store import read

__all__ = ["ModuleStats", "ExpertStats", "collect", "collect_experts", "coverage", "as_runs", "EXPERTS_SUFFIX",
           "DOWN_SUFFIX"]

#: the name suffix of an experts site (probe.capture.moe)
EXPERTS_SUFFIX = ":experts"
#: the name suffix of an experts module's down-projection input site (probe.capture.moe)
DOWN_SUFFIX = ":down_proj"


@dataclass
class ModuleStats:
    """Input statistics of one module over every kept token of every run (``D`` channels)."""

    module: str
    tokens: int  #: kept tokens (rows of the input) seen by the module
    count: np.ndarray  #: int64 [D] finite values per channel
    sum_x: np.ndarray  #: float64 [D]
    sum_x2: np.ndarray  #: float64 [D]
    absmax: np.ndarray  #: float64 [D] (float32-exact); 0 where a channel saw nothing
    sites: list[str] = field(default_factory=list)


def as_runs(runs) -> list:
    """Runs from a Run, a finished capture, a path, or a sequence of them."""
    if isinstance(runs, (str, os.PathLike)) or hasattr(runs, "sites"):
        runs = [runs]
    out = []
    for r in runs:
        if isinstance(r, (str, os.PathLike)):
            r = read(r)
        r = r.result if getattr(r, "result", None) is not None else r
        if not hasattr(r, "sites") or not hasattr(r, "meta"):
            raise ProbeError(f"runs must be run files or probe.load() results; got {type(r).__name__}; "
                             "pass paths or Run objects")
        out.append(r)
    if not out:
        raise ProbeError("runs is empty; expected at least one run; pass a run file")
    return out


def _input_sites(run) -> dict[str, list[str]]:
    """module -> its input sites (a ``phases=True`` run has a separate decode site)."""
    by_module: dict[str, list[str]] = {}
    for info in run.meta.get("sites", []):
        name = str(info.get("name", ""))
        if info.get("read") == "input" and not name.startswith("hidden_states") \
                and not name.endswith((EXPERTS_SUFFIX, DOWN_SUFFIX)):
            by_module.setdefault(info["module"], []).append(info["name"])
    return by_module


def _check_same(runs) -> None:
    first = runs[0]
    model = first.meta.get("model", {})
    for i, r in enumerate(runs[1:], 1):
        other = r.meta.get("model", {})
        if (other.get("class"), other.get("config")) != (model.get("class"), model.get("config")):
            raise ProbeError(f"run {i} comes from another model than run 0 ({other.get('class')} vs "
                             f"{model.get('class')}); expected runs of the same model; export them separately")
        if list(r.sites) != list(first.sites):
            raise ProbeError(f"run {i} captures other sites than run 0; expected identical sites; "
                             "capture every shard with the same sites=")


def collect(runs) -> list[ModuleStats]:
    """The input statistics of every module with an input site, merged over ``runs``.

    Raises:
        ProbeError: no input sites, runs of different models or sites, no moments captured.
    """
    runs = as_runs(runs)
    _check_same(runs)
    by_module = _input_sites(runs[0])
    if not by_module and _experts_sites(runs[0]):
        return []  # only mixture-of-experts sites: collect_experts has them
    if not by_module:
        raise ProbeError("the run has no input sites; expected a capture with sites='linear_inputs' or "
                         "'<module>:input'; recapture with probe.capture(model, sites='linear_inputs', "
                         "stats=('moments', 'histogram'))")
    for r in runs:
        if "moments" not in r.stats:
            raise ProbeError("the run has no moments; expected stats including 'moments'; "
                             "recapture with stats=('moments', 'histogram')")
        if r.meta.get("skip_first"):
            warnings.warn(f"probe: the run dropped the first {r.meta['skip_first']} token(s) of each sequence "
                          "(skip_first); quantizers calibrate on every token; capture with skip_first=0",
                          stacklevel=3)
    out = []
    empty = []
    for module, names in by_module.items():
        acc = None
        for r in runs:
            for name in names:
                s = r[name]
                if not s.has("moments") or not s.tokens:  # a disabled site holds no moments
                    continue
                ch = s.channel
                n = ch.count.astype(np.int64)
                nf = n.astype(np.float64)
                mean = np.where(n > 0, np.nan_to_num(ch.mean), 0.0)
                var = np.where(n > 0, np.nan_to_num(ch.var), 0.0)
                part = ModuleStats(module, int(s.tokens), n, nf * mean, nf * (var + mean * mean),
                                   np.where(n > 0, np.nan_to_num(ch.absmax), 0.0), [name])
                if acc is None:
                    acc = part
                elif len(part.count) != len(acc.count):
                    raise ProbeError(f"site {name!r} has {len(part.count)} channels in one run and "
                                     f"{len(acc.count)} in another; expected the same model; export them separately")
                else:
                    _absorb(acc, part, name)
        if acc is None:
            empty.append(module)
        else:
            out.append(acc)
    if empty:
        warnings.warn(f"probe: {len(empty)} module(s) saw no tokens and are left out: "
                      + ", ".join(empty[:5]) + (" …" if len(empty) > 5 else ""), stacklevel=3)
    if not out:
        raise ProbeError("no input site saw any token; expected a capture that ran forwards; "
                         "run the model inside the with-block")
    return out


@dataclass
class ExpertStats:
    """Input statistics of one fused experts module per expert (``E`` experts, ``D`` channels),
    over the real tokens routed to each expert in every run."""

    module: str  #: the experts module (``model.layers.0.mlp.experts``)
    tokens: np.ndarray  #: int64 [E] real tokens routed to each expert
    count: np.ndarray  #: float64 [E, D] finite values per expert and channel
    sum_x: np.ndarray  #: float64 [E, D]
    sum_x2: np.ndarray  #: float64 [E, D]
    absmax: np.ndarray  #: float64 [E, D]; 0 where an expert saw nothing
    sites: list[str] = field(default_factory=list)
    #: which projections read these inputs: ``"gate_up"`` (the experts' input, ``D`` = hidden size)
    #: or ``"down"`` (the down projection's input ``act(gate) · up``, ``D`` = the experts' intermediate size)
    proj: str = "gate_up"

    @property
    def n_experts(self) -> int:
        return int(self.tokens.shape[0])


def _absorb(acc: ModuleStats | ExpertStats, part: ModuleStats | ExpertStats, name: str) -> None:
    """Add ``part``'s sums into ``acc`` (the same module, the same shapes: checked by the caller)."""
    acc.tokens = acc.tokens + part.tokens  # type: ignore[assignment]
    acc.count = acc.count + part.count
    acc.sum_x = acc.sum_x + part.sum_x
    acc.sum_x2 = acc.sum_x2 + part.sum_x2
    acc.absmax = np.maximum(acc.absmax, part.absmax)
    if name not in acc.sites:
        acc.sites.append(name)


def _experts_sites(run) -> dict[tuple[str, str], list[str]]:
    """``(module, "gate_up" | "down")`` -> its sites, in site order."""
    by_module: dict[tuple[str, str], list[str]] = {}
    for info in run.meta.get("sites", []):
        name = str(info.get("name", ""))
        for suffix, proj in ((EXPERTS_SUFFIX, "gate_up"), (DOWN_SUFFIX, "down")):
            if name.endswith(suffix):
                by_module.setdefault((info["module"], proj), []).append(name)
    return by_module


def collect_experts(runs) -> list[ExpertStats]:
    """The per-expert input statistics of every experts site, merged over ``runs`` (``[]`` when
    the runs hold none). Sums add, maxima take the maximum: exact.

    Raises:
        ProbeError: runs of different models or sites, or experts modules whose expert or channel
            counts differ between runs.
    """
    runs = as_runs(runs)
    _check_same(runs)
    out = []
    for (module, proj), names in _experts_sites(runs[0]).items():
        acc: ExpertStats | None = None
        for r in runs:
            for name in names:
                s = r[name]
                if not s.has("experts"):  # a disabled site
                    continue
                v = s.experts
                part = ExpertStats(module, v.tokens.copy(), v.count, v.sum_x, v.sum_x2, v.absmax, [name], proj)
                if acc is None:
                    acc = part
                elif part.count.shape != acc.count.shape:
                    raise ProbeError(f"site {name!r} has {part.count.shape} experts x channels in one run and "
                                     f"{acc.count.shape} in another; expected the same model; export them separately")
                else:
                    _absorb(acc, part, name)
        if acc is not None:
            out.append(acc)
    return out


def coverage(experts: list[ExpertStats], min_tokens: int = 1) -> list[dict]:
    """Per experts module: which experts saw no token, and which fewer than ``min_tokens``.

    Returns:
        One dict per module: ``module, experts, tokens`` (list per expert), ``zero`` (experts
        with no token), ``below`` (experts with ``0 < tokens < min_tokens``), ``min_tokens``,
        ``least`` and ``most`` (token counts).
    """
    rows = []
    inputs = {x.module for x in experts if x.proj == "gate_up"}
    for x in experts:
        if x.proj != "gate_up" and x.module in inputs:
            continue  # the same tokens as the module's input: one row per module
        t = x.tokens
        rows.append({"module": x.module, "experts": x.n_experts, "tokens": [int(v) for v in t],
                     "zero": [int(e) for e in np.flatnonzero(t == 0)],
                     "below": [int(e) for e in np.flatnonzero((t > 0) & (t < min_tokens))],
                     "min_tokens": int(min_tokens), "least": int(t.min()) if t.size else 0,
                     "most": int(t.max()) if t.size else 0})
    return rows
