"""Reading results: a :class:`Run` is a list of committed windows plus the run's description.

``run[name]`` is the cumulative view of one site (all windows merged exactly), ``run.at(step)``
one window, ``run.cross`` the layer × layer matrices. Every number is derived in float64 numpy
from the stored raw state, so a file, a live capture and a merge of files all answer alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from typing import Any

import numpy as np
import torch

from . import stats as _stats
from .errors import ProbeError, closest

__all__ = ["Run", "SiteView", "ChannelView", "PositionView", "SampleView", "CrossView",
           "combine_channels", "merge_rows"]

_CLASSES = {"moments": _stats.Moments, "position": _stats.Position, "histogram": _stats.Histogram,
            "sample": _stats.Sample}


def _stat_from(kind: str, state: dict[str, np.ndarray], cross_sites: Sequence[str] = ()):
    if kind == "cross":
        stat = _stats.Cross(list(cross_sites))
        stat.members = list(range(len(cross_sites)))
    else:
        stat = _CLASSES[kind]()
    stat.load_state_dict({k: torch.from_numpy(np.asarray(v).copy()) for k, v in state.items()})
    return stat


def merge_rows(rows: Sequence[dict], cross_sites: Sequence[str] = ()) -> dict:
    """Exact merge of several windows into one (the same structure, ``step`` of the last)."""
    if not rows:
        return {"step": 0, "sites": {}, "cross": {}}
    sites: dict[str, dict[str, Any]] = {}
    cross = None
    for row in rows:
        for name, per in row["sites"].items():
            into = sites.setdefault(name, {})
            for kind, state in per.items():
                stat = _stat_from(kind, state)
                if kind in into:
                    into[kind].merge(stat)
                else:
                    into[kind] = stat
        if row.get("cross"):
            stat = _stat_from("cross", row["cross"], cross_sites)
            if cross is None:
                cross = stat
            else:
                cross.merge(stat)
    return {
        "step": rows[-1]["step"],
        "sites": {n: {k: {f: v.numpy() for f, v in st.state_dict().items()} for k, st in per.items()}
                  for n, per in sites.items()},
        "cross": {} if cross is None else {f: v.numpy() for f, v in cross.state_dict().items()},
    }


def combine_channels(n, mean, m2, m3, m4) -> tuple[float, float, float, float, float]:
    """Exact k-way merge of per-channel central moment sums into one (float64)."""
    n, mean, m2, m3, m4 = (np.asarray(a, dtype=np.float64) for a in (n, mean, m2, m3, m4))
    total = n.sum()
    if total == 0:
        return 0.0, np.nan, np.nan, np.nan, np.nan
    mu = (n * mean).sum() / total
    d = np.where(n > 0, mean - mu, 0.0)
    M2 = (m2 + n * d**2).sum()
    M3 = (m3 + 3 * d * m2 + n * d**3).sum()
    M4 = (m4 + 4 * d * m3 + 6 * d**2 * m2 + n * d**4).sum()
    return float(total), float(mu), float(M2), float(M3), float(M4)


def _shape(n, m2, m3, m4) -> tuple:
    """(var, skew, excess kurtosis): population estimators, as numpy.var and scipy.stats' defaults."""
    with np.errstate(divide="ignore", invalid="ignore"):
        n = np.asarray(n, dtype=np.float64)
        var = np.where(n > 0, m2 / np.where(n > 0, n, 1), np.nan)
        skew = np.where(m2 > 0, np.sqrt(n) * m3 / np.power(np.where(m2 > 0, m2, 1), 1.5), np.nan)
        kurt = np.where(m2 > 0, n * m4 / np.where(m2 > 0, m2, 1) ** 2 - 3.0, np.nan)
    return var, skew, kurt


class ChannelView:
    """Per-channel statistics of one site, numpy arrays ``[D]`` (NaN where a channel saw nothing)."""

    def __init__(self, m: dict[str, np.ndarray]) -> None:
        self.count = m["n"].astype(np.int64)
        empty = self.count == 0
        self.mean = np.where(empty, np.nan, m["mean"])
        self.var, self.skew, self.kurtosis = _shape(m["n"], m["m2"], m["m3"], m["m4"])
        self.std = np.sqrt(self.var)
        self.min = np.where(empty, np.nan, m["min"].astype(np.float64))
        self.max = np.where(empty, np.nan, m["max"].astype(np.float64))
        self.absmax = np.maximum(np.abs(self.min), np.abs(self.max))
        #: values with ``|x| >= 6`` per channel (the LLM.int8() outlier threshold)
        self.large = m["large"].astype(np.int64)

    def __len__(self) -> int:
        return len(self.count)


class PositionView:
    """Per-position statistics ``[P]`` over every real token (``skip_first`` does not apply)."""

    def __init__(self, p: dict[str, np.ndarray]) -> None:
        last = int(np.flatnonzero(p["tokens"]).max()) + 1 if p["tokens"].any() else 0
        self.tokens = p["tokens"][:last].astype(np.int64)
        self.count = p["n"][:last].astype(np.int64)
        empty = self.count == 0
        self.mean = np.where(empty, np.nan, p["mean"][:last])
        self.var = np.where(empty, np.nan, p["m2"][:last] / np.where(empty, 1, p["n"][:last]))
        self.std = np.sqrt(self.var)
        self.absmax = np.where(empty, np.nan, p["absmax"][:last].astype(np.float64))
        #: real tokens at positions past ``max_positions`` (not in the arrays)
        self.overflow = int(p["overflow"])

    def __len__(self) -> int:
        return len(self.tokens)


class SampleView:
    """A uniform sample of kept elements (padding and the first ``skip_first`` positions are never
    in it): parallel numpy arrays ``row, position, channel, token, value``, ordered by key."""

    def __init__(self, s: dict[str, np.ndarray]) -> None:
        filled = np.isfinite(s["key"])
        self.key = s["key"][filled]
        self.row = s["row"][filled]
        self.position = s["position"][filled]
        self.channel = s["channel"][filled]
        self.token = s["token"][filled]
        self.value = s["value"][filled].astype(np.float64)

    def __len__(self) -> int:
        return len(self.key)


class CrossView:
    """Layer × layer covariance and R² (float64 ``[S, S]``) in the order of ``sites``.

    ``cov``/``r2`` exclude the first ``skip_first`` positions; ``cov_all``/``r2_all`` cover every
    real token. Covariances are population (divided by ``n``); R² is the squared Pearson
    correlation. ``n``/``n_all`` count the (token, channel) observations.
    """

    def __init__(self, sites: Sequence[str], c: dict[str, np.ndarray]) -> None:
        self.sites = list(sites)
        self.n = float(c["keep_n"]) if c else 0.0
        self.n_all = float(c["all_n"]) if c else 0.0
        self.skipped_tokens = int(c["skipped_tokens"]) if c else 0
        self.cov, self.r2 = self._derive(c, "keep")
        self.cov_all, self.r2_all = self._derive(c, "all")
        self.mean = c["keep_mean"] if c else np.zeros(0)
        self.mean_all = c["all_mean"] if c else np.zeros(0)

    @staticmethod
    def _derive(c, v):
        if not c:
            return np.zeros((0, 0)), np.zeros((0, 0))
        n = float(c[f"{v}_n"])
        with np.errstate(divide="ignore", invalid="ignore"):
            cov = c[f"{v}_c"] / n if n > 0 else np.full_like(c[f"{v}_c"], np.nan)
            sd = np.sqrt(np.diag(cov))
            r2 = (cov / np.outer(sd, sd)) ** 2
        return cov, r2


class SiteView:
    """Everything known about one site. Scalars are Python floats; arrays are numpy."""

    def __init__(self, name: str, info: dict[str, Any], state: dict[str, dict[str, np.ndarray]],
                 meta: dict[str, Any]) -> None:
        self.name = name
        self.module = info.get("module", "")
        self.hf_index = info.get("hf_index")
        self.dtype = info.get("dtype", "")
        self._state = state
        self._meta = meta
        m = state.get("moments")
        if m:
            n, mu, m2, m3, m4 = combine_channels(m["n"], m["mean"], m["m2"], m["m3"], m["m4"])
            var, skew, kurt = (float(v) for v in _shape(n, m2, m3, m4))
            self.count = int(n)
            self.tokens = int(m["tokens"])
            self.mean, self.var, self.skew, self.kurtosis = mu, var, skew, kurt
            self.std = float(np.sqrt(var))
            self.min = float(m["min"].min()) if self.count else float("nan")
            self.max = float(m["max"].max()) if self.count else float("nan")
            self.absmax = float(m["absmax"]) if self.count else float("nan")
            row, pos, ch, tok = (int(v) for v in m["absmax_at"])
            self.absmax_at = {"row": row, "position": pos, "channel": ch, "token": tok}
            self.nan, self.posinf, self.neginf = int(m["nan"]), int(m["posinf"]), int(m["neginf"])
            self.channel = ChannelView(m)
        else:
            self.count = self.tokens = 0
            self.mean = self.var = self.std = self.skew = self.kurtosis = float("nan")
            self.min = self.max = self.absmax = float("nan")
            self.absmax_at = {"row": -1, "position": -1, "channel": -1, "token": -1}
            self.nan = self.posinf = self.neginf = 0
            self.channel = None

    def __repr__(self) -> str:
        return (f"SiteView({self.name!r}, tokens={self.tokens}, mean={self.mean:.4g}, std={self.std:.4g}, "
                f"absmax={self.absmax:.4g})")

    def _need(self, kind: str) -> dict[str, np.ndarray]:
        if not self._state.get(kind):
            raise ProbeError(f"site {self.name!r} has no {kind} statistics; expected {kind!r} in stats=; "
                             f"capture with stats including {kind!r}")
        return self._state[kind]

    @cached_property
    def position(self) -> PositionView:
        return PositionView(self._need("position"))

    @cached_property
    def sample(self) -> SampleView:
        return SampleView(self._need("sample"))

    @property
    def histogram_counts(self) -> np.ndarray:
        """Raw int64 counts of the float-bit buckets (see ``docs/format.md``)."""
        return self._need("histogram")["counts"]

    def quantile(self, q: float | Sequence[float]) -> float | np.ndarray:
        """Quantile(s) of the kept finite values, interpolated like ``numpy.quantile``.

        Within ``2**-m / (2 + 2**-m)`` relative error of the exact answer (0.39 % at m=7) for
        normal floats; exact when the data had no mantissa bits below the top ``m`` (bf16).
        """
        from .stats.histogram import quantile

        h = self._need("histogram")
        return quantile(h["counts"], bool(h["lossless"]), q)

    def histogram(self, bins: int | Sequence[float] = 100, range: tuple[float, float] | None = None):
        """Histogram ``(counts, edges)`` rendered from the bucket CDF: ``bins`` linear bins over
        ``range``, or ``bins`` given as increasing edges (``numpy.histogram``'s convention).

        Exact for bf16 data; otherwise values are spread uniformly within each bucket, cut to the
        site's exact ``[min, max]``, so edges spanning ``[min, max]`` total :attr:`count`
        exactly. With no ``range``, the site's own min and max are used.
        """
        from .stats.histogram import render

        h = self._need("histogram")
        known = bool(self._state.get("moments")) and self.count > 0
        if range is None and known:
            range = (self.min, self.max)
        return render(h["counts"], bool(h["lossless"]), bins, range,
                      limits=(self.min, self.max) if known else None)


class Run:
    """Results of a capture: committed windows (rows) and the run's description (``meta``)."""

    def __init__(self, meta: dict[str, Any], rows: list[dict], path: str | None = None) -> None:
        self.meta = meta
        self.rows = rows
        self.path = path
        self._info = {s["name"]: s for s in meta.get("sites", [])}

    def __repr__(self) -> str:
        where = f" from {self.path!r}" if self.path else ""
        return f"Run({len(self.sites)} sites, {len(self.rows)} windows{where})"

    @property
    def sites(self) -> list[str]:
        """Site names in capture order."""
        return [s["name"] for s in self.meta.get("sites", [])]

    @property
    def steps(self) -> list[int]:
        """The ``step`` label of each committed window."""
        return [int(r["step"]) for r in self.rows]

    @cached_property
    def total(self) -> dict:
        """All windows merged exactly (the raw state behind the cumulative views)."""
        if len(self.rows) == 1:
            return self.rows[0]
        return merge_rows(self.rows, self.meta.get("cross_sites", []))

    @property
    def stats(self) -> list[str]:
        """The statistics this run captured, e.g. ``["moments", "histogram"]``."""
        return list(self.meta.get("stats", []))

    def __getitem__(self, name: str) -> SiteView:
        if name not in self._info:
            raise ProbeError(f"unknown site {name!r}; expected one of run.sites{closest(name, self.sites)}")
        views = self.__dict__.setdefault("_views", {})
        if name not in views:
            views[name] = SiteView(name, self._info[name], self.total["sites"].get(name, {}), self.meta)
        return views[name]

    def __iter__(self):
        return (self[name] for name in self.sites)

    def __len__(self) -> int:
        return len(self.sites)

    @cached_property
    def cross(self) -> CrossView:
        return CrossView(self.meta.get("cross_sites", []), self.total.get("cross", {}))

    def at(self, step: int) -> Run:
        """The window committed with label ``step``."""
        for row in self.rows:
            if int(row["step"]) == step:
                return Run(self.meta, [row], self.path)
        raise ProbeError(f"no window with step {step}; expected one of {self.steps}; pass a step from run.steps")
