"""Reading results: a :class:`Run` is a run's description plus its committed windows.

``run[name]`` is the cumulative view of one site (all windows merged exactly), ``run.at(step)``
one window, ``run.cross`` the layer × layer matrices. Every number is derived in float64 numpy
from the stored raw state, so a file, a live capture and a merge of files all answer alike.
A run read from a file is lazy: opening it reads the description; ``run[name]`` reads that
site's cumulative state (kept up to date by the writer at each commit, so this costs the same
for 1 or 10,000 windows); ``run.at(step)`` reads one window. This module never imports torch.

The examples below assume a captured ``run`` (they run as doctests with one), e.g.::

    import probe, torch, transformers
    model = transformers.GPT2Model(transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2))
    with probe.capture(model) as run:
        model(torch.tensor([[1, 2, 3, 4]]), attention_mask=torch.tensor([[1, 1, 1, 0]]))
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from functools import cached_property
from typing import Any, overload

import numpy as np

from ..errors import ProbeError, closest
from ..stats._state import SPECS, WindowState, kway_moments, merge_rows
from .attention import AttentionView
from .moe import ExpertsView, RouterView, is_moe_site

__all__ = ["Run", "SiteView", "ChannelView", "PositionView", "SampleView", "CrossView", "NormView", "TOPK_DTYPE",
           "combine_channels", "merge_rows"]


class MemorySource:
    """Windows held in memory (a capture without ``out=``, a merge, one window of a file)."""

    def __init__(self, rows: list[WindowState], cross_sites: Sequence[str] = ()) -> None:
        self.rows = rows
        self._cross_sites = list(cross_sites)

    @property
    def steps(self) -> list[int]:
        return [int(r.step) for r in self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    def window(self, r: int) -> WindowState:
        return self.rows[r]

    @cached_property
    def total(self) -> WindowState:
        if len(self.rows) == 1:
            return self.rows[0]
        return merge_rows(self.rows, self._cross_sites)

    def site_total(self, name: str) -> dict:
        return self.total.sites.get(name, {})

    def cross_total(self) -> dict:
        return self.total.cross


class _Windows(Sequence):
    """``run.rows`` of a file: each window read when indexed."""

    def __init__(self, source) -> None:
        self._source = source

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        if not -n <= i < n:
            raise IndexError(i)
        return self._source.window(i % n)


def combine_channels(n: np.ndarray, mean: np.ndarray, m2: np.ndarray, m3: np.ndarray,
                     m4: np.ndarray) -> tuple[float, float, float, float, float]:
    """Exact k-way merge of per-channel central moment sums into one, by the same algebra as
    every other merge (:func:`probe.stats._state.kway_moments`, after Pébay 2008).

    Args:
        n, mean, m2, m3, m4: per-channel counts, means and central sums ``Σ (x - mean)^p``, ``[D]``.

    Returns:
        ``(n, mean, M2, M3, M4)`` of all channels together (float64); NaN moments when ``n == 0``.

    Example:
        >>> combine_channels(np.array([1, 1]), np.array([0.0, 2.0]), np.zeros(2), np.zeros(2), np.zeros(2))
        (2.0, 1.0, 2.0, 0.0, 2.0)
    """
    n = np.asarray(n, dtype=np.float64)
    if n.sum() == 0:
        return 0.0, np.nan, np.nan, np.nan, np.nan
    parts = np.stack([n, *(np.asarray(a, dtype=np.float64) for a in (mean, m2, m3, m4))], 1)
    total, mu, M2, M3, M4 = kway_moments(list(parts), axis=0)
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
    """Per-channel statistics of one site over its kept tokens: ``run[site].channel``.

    Attributes (numpy ``[D]``; float64 in activation units, NaN where a channel saw nothing):
    ``count`` (int64), ``mean``, ``var``, ``std``, ``skew``, ``kurtosis`` (population
    estimators, as ``numpy.var`` and scipy's defaults), ``min``, ``max``, ``absmax``; ``large``
    (int64): values with ``|x| >= 6``, the LLM.int8() outlier threshold (Dettmers et al. 2022);
    ``sum``, ``sum_squares``: ``Σ x``, ``Σ x²`` (0 where empty).

    Args:
        m: a site's raw ``moments`` state.

    Example:
        >>> ch = run[0].channel
        >>> ch.mean.shape, bool((ch.count == run[0].tokens).all())
        ((32,), True)
    """

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
        n = np.asarray(m["n"], np.float64)
        mean = np.asarray(m["mean"], np.float64)
        #: ``Σ x`` per channel (0 where empty), activation units
        self.sum = n * mean
        #: ``Σ x²`` per channel (0 where empty), activation units squared
        self.sum_squares = np.asarray(m["m2"], np.float64) + n * mean * mean

    def __len__(self) -> int:
        return len(self.count)


class PositionView:
    """Per-position statistics over every real token (``skip_first`` does not apply):
    ``run[site].position``.

    Attributes (numpy ``[P]``, ``P`` the last position any real token reached + 1): ``tokens``
    (int64, real tokens at each absolute position), ``count`` (int64, finite values),
    ``mean``, ``var``, ``std``, ``absmax`` (float64, activation units; NaN where no token);
    ``overflow``: real tokens at positions ``>= max_positions`` (not in the arrays).

    Args:
        p: a site's raw ``position`` state.

    Example:
        >>> run[0].position.tokens.tolist()  # rows of 6 and 4 real tokens
        [2, 2, 2, 2, 1, 1]
    """

    def __init__(self, p: dict[str, np.ndarray]) -> None:
        last = int(np.flatnonzero(p["tokens"]).max()) + 1 if p["tokens"].any() else 0
        self.tokens = p["tokens"][:last].astype(np.int64)
        self.count = p["n"][:last].astype(np.int64)
        empty = self.count == 0
        self.mean = np.where(empty, np.nan, p["mean"][:last])
        self.var = np.where(empty, np.nan, p["m2"][:last] / np.where(empty, 1, p["n"][:last]))
        self.std = np.sqrt(self.var)
        self.absmax = np.where(empty, np.nan, p["absmax"][:last].astype(np.float64))
        #: real tokens at positions ``>= max_positions`` (not in the arrays)
        self.overflow = int(p["overflow"])

    def __len__(self) -> int:
        return len(self.tokens)


class SampleView:
    """A uniform sample of kept elements (padding and the first ``skip_first`` positions are never
    in it): ``run[site].sample``.

    Attributes (parallel numpy arrays ``[n]``, ordered by key): ``key`` (the float64 random
    keys, bottom-k), ``row``, ``position``, ``channel``, ``token`` (int64), ``value`` (float64,
    activation units). Seeded per batch, the same elements are drawn at every site.

    Args:
        s: a site's raw ``sample`` state.

    Example:
        >>> a, b = run[0].sample, run[-1].sample
        >>> bool((a.position == b.position).all() and (a.channel == b.channel).all())
        True
    """

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


#: dtype of ``run[site].topk``
TOPK_DTYPE = np.dtype([("value", np.float64), ("row", np.int64), ("position", np.int64),
                       ("channel", np.int64), ("token", np.int64)])


def topk_array(t: dict[str, np.ndarray]) -> np.ndarray:
    """The filled slots of a ``topk`` state as a structured array.

    Args:
        t: a site's raw ``topk`` state (unfilled slots hold NaN values).

    Returns:
        ``[k]`` of :data:`TOPK_DTYPE`, largest ``|value|`` first.

    Example:
        >>> len(topk_array({f: np.array([2.0, np.nan]) for f in TOPK_DTYPE.names}))
        1
    """
    filled = ~np.isnan(t["value"])
    out = np.empty(int(filled.sum()), dtype=TOPK_DTYPE)
    out["value"] = t["value"][filled].astype(np.float64)
    for f in ("row", "position", "channel", "token"):
        out[f] = t[f][filled]
    return out


class NormView:
    """The per-token L2 norm ``||h||`` of one site (see :mod:`probe.stats.norm`).

    Over kept tokens with a finite norm (``skip_first`` applies): ``count``, ``mean``, ``var``,
    ``std``, ``skew``, ``kurtosis``, ``min``, ``max`` (Python floats, activation units),
    :meth:`quantile`, :meth:`histogram`; ``nonfinite``: kept tokens without a finite norm.
    ``scale = sqrt(D) / mean``: the factor that brings the mean norm to ``sqrt(D)`` (the
    sparse-autoencoder input normalisation). ``anisotropy``: mean cosine between two distinct
    kept tokens, ``(||Σ u||² - n) / (n (n - 1))``. ``position_mean``, ``position_std`` (``[P]``,
    NaN where no real token) cover every real token; ``position_count`` the tokens with a norm.
    ``sum_squares``: ``Σ ||h||²`` over the counted tokens.

    Args:
        s: a site's raw ``norm`` state.

    Example:
        >>> n = run[0].norm
        >>> n.dim, bool(n.min <= n.mean <= n.max), len(n.position_mean)
        (32, True, 6)
    """

    def __init__(self, s: dict[str, np.ndarray]) -> None:
        self._s = s
        n = float(s["n"])
        self.count = int(n)
        self.mean = float(s["mean"]) if n else float("nan")
        var, skew, kurt = (float(v) for v in _shape(n, s["m2"], s["m3"], s["m4"]))
        self.var, self.skew, self.kurtosis = var, skew, kurt
        self.std = float(np.sqrt(var))
        self.min = float(s["min"]) if n else float("nan")
        self.max = float(s["max"]) if n else float("nan")
        self.nonfinite = int(s["nonfinite"])
        #: ``Σ ||h||²`` over the counted tokens (activation units squared)
        self.sum_squares = float(s["m2"]) + n * self.mean * self.mean if n else 0.0
        self.dim = int(np.shape(s["unit_sum"])[0])
        self.scale = float(np.sqrt(self.dim) / self.mean) if n and self.mean > 0 else float("nan")
        un = float(s["unit_n"])
        total = float(np.dot(s["unit_sum"], s["unit_sum"]))
        self.anisotropy = (total - un) / (un * (un - 1)) if un > 1 else float("nan")
        pn = s["pos_n"]
        last = int(np.flatnonzero(pn).max()) + 1 if pn.any() else 0
        empty = pn[:last] == 0
        self.position_count = pn[:last].astype(np.int64)
        self.position_mean = np.where(empty, np.nan, s["pos_mean"][:last])
        self.position_std = np.sqrt(np.where(empty, np.nan, s["pos_m2"][:last] / np.where(empty, 1, pn[:last])))

    @property
    def counts(self) -> np.ndarray:
        """The norms' float-bit bucket counts, int64 in the full ``2**(9+m)`` layout of the
        histogram statistic (the negative half empty).

        Example:
            >>> int(run[0].norm.counts.sum()) == run[0].norm.count
            True
        """
        c = np.asarray(self._s["counts"], dtype=np.int64)
        return np.concatenate([c, np.zeros_like(c)])

    @overload
    def quantile(self, q: float) -> float: ...
    @overload
    def quantile(self, q: Sequence[float] | np.ndarray) -> np.ndarray: ...

    def quantile(self, q: float | Sequence[float] | np.ndarray) -> float | np.ndarray:
        """Quantile(s) of the norms.

        Args:
            q: a probability or a sequence of them, in ``[0, 1]``.

        Returns:
            A float (or float64 ``[len(q)]``) in activation units, within ``2**-m / (2 + 2**-m)``
            relative error of the exact quantile.

        Example:
            >>> n = run[0].norm
            >>> bool(n.min <= n.quantile(0.5) <= n.max)
            True
        """
        from ..stats._buckets import quantile

        return quantile(self.counts, False, q)

    def histogram(self, bins: int = 100, range: tuple[float, float] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Linear-bin histogram of the norms, rendered from the buckets.

        Args:
            bins: the number of linear bins.
            range: ``(lo, hi)``; by default the norms' ``(min, max)``.

        Returns:
            ``(counts, edges)``: float64 ``[bins]`` and ``[bins + 1]``.

        Example:
            >>> counts, edges = run[0].norm.histogram(bins=4)
            >>> counts.shape, float(edges[0]) == run[0].norm.min
            ((4,), True)
        """
        from ..stats._buckets import render

        if range is None and self.count:
            range = (self.min, self.max)
        return render(self.counts, False, bins, range)

    def __repr__(self) -> str:
        return f"NormView(count={self.count}, mean={self.mean:.4g}, std={self.std:.4g}, scale={self.scale:.4g})"


class CrossView:
    """Layer × layer covariance, R² and cosines (float64 ``[S, S]``) in the order of ``sites``.

    ``cov``/``r2`` exclude the first ``skip_first`` positions; ``cov_all``/``r2_all`` cover every
    real token. Covariances are population (divided by ``n``, activation units squared); R² is
    the squared Pearson correlation. ``n``/``n_all`` count the (token, channel) observations and
    ``cos_n``/``cos_n_all`` the tokens of the cosines (0 when not captured).

    **Not captured, one way** (as :class:`SiteView`): ``cov``, ``r2``, ``cov_all``, ``r2_all``
    raise :class:`ProbeError` without ``cross``; ``cos``, ``cos_all``, :attr:`cos_hist`,
    :meth:`cos_quantile` and :attr:`block_influence` raise without ``cos``. :meth:`has`
    (``kind in run.cross``) tells without raising.

    Args:
        sites: the cross-layer sites, in order (``meta["cross_sites"]``).
        c: the raw cross state ``{field: ndarray}`` (empty when nothing was captured).
        stats: the statistics the run captured (``None``: unknown; then a statistic counts as
            captured when its state is there).

    Example:
        >>> c = run.cross
        >>> c.r2.shape, "cross" in c, "cos" in c
        ((3, 3), True, False)
    """

    def __init__(self, sites: Sequence[str], c: dict[str, np.ndarray], stats: Sequence[str] | None = None) -> None:
        self.sites = list(sites)
        #: the statistics the run captured (``None``: unknown)
        self._stats = None if stats is None else list(stats)
        self.n = float(c["keep_n"]) if c else 0.0
        self.n_all = float(c["all_n"]) if c else 0.0
        self.skipped_tokens = int(c["skipped_tokens"]) if c else 0
        self._cov, self._r2 = self._derive(c, "keep")
        self._cov_all, self._r2_all = self._derive(c, "all")
        self.mean = c["keep_mean"] if c else np.zeros(0)
        self.mean_all = c["all_mean"] if c else np.zeros(0)
        self._c = c
        self._cos_keep, self.cos_n = self._cos(c, "keep")
        self._cos_all, self.cos_n_all = self._cos(c, "all")

    def has(self, kind: str) -> bool:
        """Whether the run captured ``kind`` (``"cross"`` or ``"cos"``) for these sites.

        Args:
            kind: ``"cross"`` (covariance, R²) or ``"cos"`` (cosines, block influence).

        Returns:
            ``True`` when the views of ``kind`` can be read.

        Example:
            >>> run.cross.has("cross"), run.cross.has("cos")
            (True, False)
        """
        if kind not in ("cross", "cos"):
            return False
        if self._stats is not None:
            return kind in self._stats
        return bool(self._c) and (kind == "cross" or "keep_cos" in self._c)

    def __contains__(self, kind: object) -> bool:
        return isinstance(kind, str) and self.has(kind)

    def _need(self, stat: str) -> None:
        if not self.has(stat):
            raise not_captured("the cross-layer view", stat, self._stats)

    @property
    def available(self) -> bool:
        """``has("cross")``: whether the run captured the cross-layer statistic.

        Example:
            >>> run.cross.available
            True
        """
        return self.has("cross")

    @property
    def cov(self) -> np.ndarray:
        """Covariance ``[S, S]`` without the first ``skip_first`` positions.

        Raises:
            ProbeError: ``cross`` not captured.

        Example:
            >>> bool((run.cross.cov.diagonal() > 0).all())
            True
        """
        self._need("cross")
        return self._cov

    @property
    def r2(self) -> np.ndarray:
        """R² ``[S, S]`` without the first ``skip_first`` positions (1 on the diagonal).

        Raises:
            ProbeError: ``cross`` not captured.

        Example:
            >>> bool(np.allclose(run.cross.r2.diagonal(), 1))
            True
        """
        self._need("cross")
        return self._r2

    @property
    def cov_all(self) -> np.ndarray:
        """Covariance ``[S, S]`` over every real token.

        Raises:
            ProbeError: ``cross`` not captured.

        Example:
            >>> run.cross.cov_all.shape
            (3, 3)
        """
        self._need("cross")
        return self._cov_all

    @property
    def r2_all(self) -> np.ndarray:
        """R² ``[S, S]`` over every real token.

        Raises:
            ProbeError: ``cross`` not captured.

        Example:
            >>> run.cross.r2_all.shape
            (3, 3)
        """
        self._need("cross")
        return self._r2_all

    @property
    def cos(self) -> np.ndarray:
        """Mean per-token cosine ``cos(h_i, h_j)`` ``[S, S]`` over kept tokens.

        Raises:
            ProbeError: ``cos`` not captured (it is opt-in: ``stats=(..., "cross", "cos")``).

        Example:
            >>> "cos" in run.cross
            False
        """
        self._need("cos")
        return self._cos_keep

    @property
    def cos_all(self) -> np.ndarray:
        """Mean per-token cosine ``[S, S]`` over every real token.

        Raises:
            ProbeError: ``cos`` not captured.

        Example:
            >>> run.cross.has("cos")
            False
        """
        self._need("cos")
        return self._cos_all

    @staticmethod
    def _cos(c: dict[str, np.ndarray], v: str) -> tuple[np.ndarray, float]:
        if not c or f"{v}_cos" not in c:
            return np.zeros((0, 0)), 0.0
        n = float(c[f"{v}_cos_n"])
        return (c[f"{v}_cos"] / n if n > 0 else np.full_like(c[f"{v}_cos"], np.nan)), n

    @property
    def cos_hist(self) -> np.ndarray:
        """Raw int64 counts ``[S - 1, 2**(8 + m)]`` of ``1 - cos(h_l, h_{l+1})`` per kept token over
        float-bit buckets (the positive half of the histogram's layout, ``m = 4`` mantissa bits).

        Raises:
            ProbeError: ``cos`` not captured.

        Example:
            >>> "cos" in run.cross  # the counts need stats=(..., "cross", "cos")
            False
        """
        self._need("cos")
        h = self._c.get("keep_cos_hist") if self._c else None
        return np.zeros((0, 0), dtype=np.int64) if h is None else np.asarray(h, dtype=np.int64)[:-1]

    def cos_quantile(self, q: float | Sequence[float]) -> np.ndarray:
        """Quantile(s) of the per-token ``cos(h_l, h_{l+1})`` for each consecutive pair.

        Args:
            q: a probability or a sequence of them, in ``[0, 1]``.

        Returns:
            float64 ``[S - 1]`` (or ``[S - 1, len(q)]``), from :attr:`cos_hist`: within
            ``2**-4 / (2 + 2**-4)`` (3 %) of the exact value of ``1 - cos``.

        Raises:
            ProbeError: ``cos`` not captured.

        Example:
            >>> run.cross.has("cos")  # cos_quantile(0.5) needs stats=(..., "cross", "cos")
            False
        """
        from ..stats._buckets import quantile

        qs = np.atleast_1d(np.asarray(q, dtype=np.float64))
        rows = []
        for counts in self.cos_hist:
            full = np.concatenate([counts, np.zeros_like(counts)])
            rows.append(1.0 - np.atleast_1d(quantile(full, False, 1.0 - qs)))
        out = np.array(rows).reshape(len(rows), len(qs))
        return out[:, 0] if np.ndim(q) == 0 else out

    @property
    def block_influence(self) -> np.ndarray:
        """``1 - E[cos(h_l, h_{l+1})]`` for consecutive sites ``[S - 1]`` over kept tokens
        (Men et al. 2024, "ShortGPT", eq. 1): how much each block turns a token's hidden state.

        Raises:
            ProbeError: ``cos`` not captured.

        Example:
            >>> run.cross.has("cos")  # block_influence needs stats=(..., "cross", "cos")
            False
        """
        self._need("cos")
        return 1.0 - np.diagonal(self._cos_keep, 1) if self._cos_keep.size else np.zeros(0)

    @staticmethod
    def _derive(c: dict[str, np.ndarray], v: str) -> tuple[np.ndarray, np.ndarray]:
        if not c:
            return np.zeros((0, 0)), np.zeros((0, 0))
        n = float(c[f"{v}_n"])
        with np.errstate(divide="ignore", invalid="ignore"):
            cov = c[f"{v}_c"] / n if n > 0 else np.full_like(c[f"{v}_c"], np.nan)
            sd = np.sqrt(np.diag(cov))
            r2 = (cov / np.outer(sd, sd)) ** 2
        return cov, r2


def not_captured(what: str, kind: str, stats: Sequence[str] | None = None) -> ProbeError:
    """The one error every view raises for a statistic that was not captured.

    Args:
        what: whose statistic, e.g. ``"site 'hidden_states.1'"`` or ``"the cross-layer view"``.
        kind: the statistic's name (one of ``probe.stats.NAMES``).
        stats: the statistics the run did capture, when known.

    Returns:
        A :class:`~probe.errors.ProbeError` naming the statistic and the fix (to be raised).

    Example:
        >>> print(not_captured("site 'x'", "cos", ["moments"]))
        site 'x' has no 'cos' statistic (not captured); expected 'cos' in stats, got ['moments']; ...
    """
    if stats is not None and kind in stats:  # the run has it, elsewhere: say so rather than "capture it"
        return ProbeError(f"{what} has no {kind!r} state: the run captured {kind!r}, but at other sites (this "
                          f"site does not record it, or was disabled); expected a site holding it; read it where "
                          f"`{kind!r} in run[site]`")
    got = "" if stats is None else f", got {list(stats)!r}"
    return ProbeError(f"{what} has no {kind!r} statistic (not captured); expected {kind!r} in stats{got}; "
                      f"capture with stats including {kind!r}")


class SiteView:
    """Everything known about one site: ``run[name]`` (or ``run[i]``, the i-th of ``run.sites``).

    Scalars are Python floats in activation units, arrays are numpy. The headline numbers
    (``count``, ``tokens``, ``mean``, ``var``, ``std``, ``skew``, ``kurtosis``, ``min``, ``max``,
    ``absmax``, ``absmax_at``, ``nan``, ``posinf``, ``neginf``) summarise the ``moments``
    statistic over the kept tokens; a site that recorded none reads ``count == 0`` and NaN.

    **Not captured, one way**: every other view (:attr:`channel`, :attr:`position`,
    :attr:`sample`, :attr:`topk`, :attr:`norm`, :attr:`anisotropy`, :attr:`histogram_counts`,
    :meth:`quantile`, :meth:`abs_quantile`, :meth:`histogram`) raises :class:`ProbeError`
    ``"site ... has no '<kind>' statistic (not captured); ... capture with stats including '<kind>'"`` when the site
    holds no state of that statistic (the run did not capture it, or the site was disabled);
    :meth:`has` (``kind in view``) tells without raising. Captured but empty stays NaN / 0.

    ``grad``: the site's gradient ``∂loss/∂activation`` as a view of its own (the site
    ``"<name>@grad"`` of a ``capture(grads=True)`` run), ``None`` when not recorded.

    Args:
        name: the site's name.
        info: its description in ``meta["sites"]`` (``module``, ``hf_index``, ``dtype``).
        state: its raw state, ``{kind: {field: ndarray}}`` (see :mod:`probe.stats._state`).
        meta: the run's description.

    Example:
        >>> s = run["hidden_states.1"]
        >>> s.count == s.tokens * 32, s.has("histogram"), "cos" in s
        (True, True, False)
    """

    def __init__(self, name: str, info: dict[str, Any], state: dict[str, dict[str, np.ndarray]],
                 meta: dict[str, Any]) -> None:
        self.name = name
        self.module = info.get("module", "")
        self.hf_index = info.get("hf_index")
        self.dtype = info.get("dtype", "")
        self._state = state
        self._meta = meta
        #: the gradient ``∂loss/∂activation`` of this site as a view of its own (``capture(grads=True)``:
        #: the site ``"<name>@grad"``); ``None`` when the run recorded none
        self.grad: SiteView | None = None
        m = state.get("moments")
        self.count: int = 0
        self.tokens: int = 0
        self.mean = self.var = self.std = self.skew = self.kurtosis = float("nan")
        self.min = self.max = self.absmax = float("nan")
        self.absmax_at: dict[str, int] = {"row": -1, "position": -1, "channel": -1, "token": -1}
        self.nan = self.posinf = self.neginf = 0
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
        else:  # a site with only its own statistic: its real tokens (a router's or attention's queries)
            own = state.get("attention") or state.get("router")
            if own and "tokens" in own:
                self.tokens = int(np.asarray(own["tokens"]))

    def __repr__(self) -> str:
        if self.has("router"):  # a mixture-of-experts site holds only its own statistic
            return f"SiteView({self.name!r}, {self.router!r})"
        if self.has("experts"):
            return f"SiteView({self.name!r}, {self.experts!r})"
        if self.has("attention"):
            return f"SiteView({self.name!r}, {self.attention!r})"
        if is_moe_site(self.name) or self.name.endswith(":attention"):
            return f"SiteView({self.name!r}, nothing recorded)"
        return (f"SiteView({self.name!r}, tokens={self.tokens}, mean={self.mean:.4g}, std={self.std:.4g}, "
                f"absmax={self.absmax:.4g})")

    def has(self, kind: str) -> bool:
        """Whether this site holds state of statistic ``kind`` (the run captured it and the site
        recorded it); the views of a statistic it lacks raise :class:`ProbeError`.

        Args:
            kind: a statistic name (``"moments"``, ``"position"``, ``"histogram"``, ``"sample"``,
                ``"topk"``, ``"norm"``).

        Returns:
            ``True`` when the view of ``kind`` can be read.

        Example:
            >>> run[0].has("topk"), run[0].has("cos")
            (True, False)
        """
        return bool(self._state.get(kind))

    def __contains__(self, kind: object) -> bool:
        return isinstance(kind, str) and self.has(kind)

    def _need(self, kind: str) -> dict[str, np.ndarray]:
        if not self.has(kind):
            stats = self._meta.get("stats") or []
            if kind in stats and kind not in SPECS:
                raise ProbeError(f"site {self.name!r}: statistic {kind!r} was captured but is not registered in this "
                                 f"process; expected its class registered before reading; call "
                                 f"probe.stats.register(<its class>) before probe.load")
            raise not_captured(f"site {self.name!r}", kind, stats)
        return self._state[kind]

    def state(self, kind: str) -> dict[str, np.ndarray]:
        """The raw state of statistic ``kind`` at this site: ``{field: array}`` as its declaration
        (``probe.stats._state.SPECS[kind]``) names the fields; the way to read a statistic
        registered with ``probe.stats.register``, which has no view of its own.

        Args:
            kind: a statistic name.

        Returns:
            The cumulative state over every window (the arrays are the run's own: do not modify).

        Raises:
            ProbeError: ``kind`` was not captured at this site, or was captured by a statistic
                this process has not registered.

        Example:
            >>> sorted(run[0].state("histogram"))
            ['counts', 'lossless']
        """
        return self._need(kind)

    @cached_property
    def router(self) -> RouterView:
        """Routing statistics of a mixture-of-experts router site (``"<router>:router"``,
        :class:`probe.results.moe.RouterView`); raises :class:`ProbeError` elsewhere."""
        return RouterView(self._need("router"))

    @cached_property
    def attention(self) -> AttentionView:
        """Per-head MaxLogit, attention entropy and sink mass of an attention site
        (``"<module>:attention"``, :class:`probe.results.attention.AttentionView`); raises
        :class:`ProbeError` elsewhere."""
        return AttentionView(self._need("attention"))

    @cached_property
    def experts(self) -> ExpertsView:
        """Per-expert input statistics of an experts site (``"<experts>:experts"``,
        :class:`probe.results.moe.ExpertsView`); raises :class:`ProbeError` elsewhere."""
        return ExpertsView(self._need("experts"))

    @cached_property
    def channel(self) -> ChannelView:
        """Per-channel statistics ``[D]`` over the kept tokens (:class:`ChannelView`).

        Raises:
            ProbeError: ``moments`` not captured at this site.

        Example:
            >>> len(run[0].channel)
            32
        """
        return ChannelView(self._need("moments"))

    @cached_property
    def position(self) -> PositionView:
        """Per-position statistics ``[P]`` over every real token (:class:`PositionView`).

        Raises:
            ProbeError: ``position`` not captured at this site.

        Example:
            >>> len(run[0].position)
            6
        """
        return PositionView(self._need("position"))

    @cached_property
    def sample(self) -> SampleView:
        """A uniform sample of kept elements (:class:`SampleView`).

        Raises:
            ProbeError: ``sample`` not captured at this site.

        Example:
            >>> sm = run[0].sample
            >>> len(sm) > 0 and bool((sm.position < 6).all())
            True
        """
        return SampleView(self._need("sample"))

    @cached_property
    def topk(self) -> np.ndarray:
        """The largest finite ``|x|`` over every real token (first positions included).

        Returns:
            A structured array ``[k]`` (:data:`TOPK_DTYPE`: ``value, row, position, channel,
            token``), largest ``|value|`` first; ties go to the earliest (row, position, channel).

        Raises:
            ProbeError: ``topk`` not captured at this site.

        Example:
            >>> t = run[0].topk
            >>> t.dtype.names, bool(abs(t["value"][0]) == run[0].position.absmax.max())
            (('value', 'row', 'position', 'channel', 'token'), True)
        """
        return topk_array(self._need("topk"))

    @cached_property
    def norm(self) -> NormView:
        """The per-token L2 norm distribution (:class:`NormView`).

        Raises:
            ProbeError: ``norm`` not captured at this site.

        Example:
            >>> run[0].norm.count == run[0].tokens
            True
        """
        return NormView(self._need("norm"))

    @property
    def anisotropy(self) -> float:
        """Mean cosine similarity between two distinct kept tokens (``norm.anisotropy``).

        Raises:
            ProbeError: ``norm`` not captured at this site.

        Example:
            >>> -1 <= run[0].anisotropy <= 1
            True
        """
        return self.norm.anisotropy

    @property
    def histogram_counts(self) -> np.ndarray:
        """Raw int64 counts ``[2**(9+m)]`` of the float-bit buckets (see ``docs/format.md``).

        Raises:
            ProbeError: ``histogram`` not captured at this site.

        Example:
            >>> int(run[0].histogram_counts.sum()) == run[0].count
            True
        """
        return self._need("histogram")["counts"]

    @property
    def histogram_lossless(self) -> bool:
        """Whether the histogram holds every value exactly (no mantissa bits below the top ``m``,
        e.g. bf16 data): then quantiles and rendered histograms are exact.

        Raises:
            ProbeError: ``histogram`` not captured at this site.

        Example:
            >>> run[0].histogram_lossless  # float32 activations of a random model
            False
        """
        return bool(self._need("histogram")["lossless"])

    @overload
    def quantile(self, q: float) -> float: ...
    @overload
    def quantile(self, q: Sequence[float] | np.ndarray) -> np.ndarray: ...

    def quantile(self, q: float | Sequence[float] | np.ndarray) -> float | np.ndarray:
        """Quantile(s) of the kept finite values, interpolated like ``numpy.quantile``.

        Args:
            q: a probability or a sequence of them, in ``[0, 1]``.

        Returns:
            A float for a scalar ``q``, else a float64 array ``[len(q)]`` (activation units).
            Within ``2**-m / (2 + 2**-m)`` relative error of the exact answer (0.39 % at m=7) for
            normal floats; exact when the data had no mantissa bits below the top ``m`` (bf16).

        Raises:
            ProbeError: ``histogram`` not captured at this site.

        Example:
            >>> s = run[0]
            >>> bool(s.min <= s.quantile(0.5) <= s.max)
            True
        """
        from ..stats._buckets import quantile

        h = self._need("histogram")
        return quantile(h["counts"], bool(h["lossless"]), q)

    @overload
    def abs_quantile(self, q: float) -> float: ...
    @overload
    def abs_quantile(self, q: Sequence[float] | np.ndarray) -> np.ndarray: ...

    def abs_quantile(self, q: float | Sequence[float] | np.ndarray) -> float | np.ndarray:
        """Quantile(s) of ``|x|`` over the kept finite values (both signs of the histogram folded
        onto the positive half), with the error bound of :meth:`quantile`. ``abs_quantile(0.5)``
        is the median magnitude of the massive-activation rule.

        Args:
            q: a probability or a sequence of them, in ``[0, 1]``.

        Returns:
            A float for a scalar ``q``, else a float64 array ``[len(q)]`` (activation units, >= 0).

        Raises:
            ProbeError: ``histogram`` not captured at this site.

        Example:
            >>> s = run[0]
            >>> bool(0 <= s.abs_quantile(0.5) <= s.absmax)
            True
        """
        from ..stats._buckets import Buckets, quantile

        h = self._need("histogram")
        buckets = Buckets.of(np.shape(h["counts"])[0])
        folded = buckets.signed_counts(buckets.magnitudes(h["counts"]))
        return quantile(folded, bool(h["lossless"]), q)

    def histogram(self, bins: int | Sequence[float] = 100, range: tuple[float, float] | None = None, *,
                  integer: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Histogram rendered from the bucket CDF, as ``numpy.histogram`` returns it.

        Exact for bf16 data; otherwise values are spread uniformly within each bucket, cut to the
        site's exact ``[min, max]``, so edges spanning ``[min, max]`` total :attr:`count`
        exactly. The spread makes the counts fractional (a bucket cut by a bin edge gives each
        side its share, often below one value); ``integer=True`` rounds the cumulative count at
        every edge instead, giving whole counts that still total the same.

        Args:
            bins: the number of linear bins over ``range``, or increasing edges.
            range: ``(lo, hi)``; by default the site's own ``(min, max)``.
            integer: return int64 counts (rounded at the edges) rather than the fractional spread.

        Returns:
            ``(counts, edges)``: ``[bins]`` (float64, fractional; int64 with ``integer``) and
            float64 ``[bins + 1]``.

        Raises:
            ProbeError: ``histogram`` not captured at this site.

        Example:
            >>> counts, edges = run[0].histogram(bins=10)
            >>> counts.shape, edges.shape, round(float(counts.sum())) == run[0].count
            ((10,), (11,), True)
            >>> whole, _ = run[0].histogram(bins=10, integer=True)
            >>> whole.dtype, int(whole.sum()) == run[0].count, bool(np.all(np.abs(whole - counts) <= 1))
            (dtype('int64'), True, True)
        """
        from ..stats._buckets import render

        h = self._need("histogram")
        known = self.has("moments") and self.count > 0
        if range is None and known:
            range = (self.min, self.max)
        counts, edges = render(h["counts"], bool(h["lossless"]), bins, range,
                               limits=(self.min, self.max) if known else None)
        if integer:
            below = np.rint(np.concatenate([[0.0], np.cumsum(counts)])).astype(np.int64)
            counts = np.diff(below)
        return counts, edges


class Run:
    """Results of a capture: the run's description (``meta``, a dict) and its committed windows.

    Args:
        meta: the description (root attribute ``meta`` of the file).
        rows: windows held in memory (:class:`~probe.stats._state.WindowState`).
        path: the file the run was read from, if any.
        source: where windows and cumulative state are read from (a file reader); ``rows`` is
            ignored when given.

    ``run[name]`` / ``run[i]`` is a site's cumulative :class:`SiteView`, ``run.cross`` the
    :class:`CrossView`, ``run.at(step)`` one window as a Run; iterating yields the site views.
    A statistic not captured raises :class:`ProbeError` from its view (see :class:`SiteView`).

    Example:
        >>> run
        Run(3 sites, 1 windows)
        >>> [s.name for s in run] == run.sites, len(run)
        (True, 3)
    """

    def __init__(self, meta: dict[str, Any], rows: list[WindowState] | None = None, path: str | None = None,
                 *, source=None) -> None:
        self.meta = meta
        self.path = path
        self._source = source if source is not None else MemorySource(list(rows or []),
                                                                       meta.get("cross_sites", []))
        self._info = {s["name"]: s for s in meta.get("sites", [])}
        self._views: dict[str, SiteView] = {}

    def __repr__(self) -> str:
        where = f" from {self.path!r}" if self.path else ""
        return f"Run({len(self.sites)} sites, {len(self._source)} windows{where})"

    def _repr_html_(self) -> str:
        """A notebook's view of the run: its description and one row per site (tokens, mean,
        std, excess kurtosis, exact min, max and absmax); ``probe report`` writes the full page.

        Example:
            >>> page = run._repr_html_()
            >>> page.count("<tr>") == len(run.sites) + 1, "hidden_states.2" in page
            (True, True)
        """
        import html

        def num(v: float) -> str:
            return f"{v:.4g}" if np.isfinite(v) else "–"

        model = self.meta.get("model", {})
        name = model.get("name_or_path") or model.get("class") or "model"
        head = (f"<b>probe Run</b> · {html.escape(str(self.path or 'in memory'))} · {html.escape(str(name))} · "
                f"{len(self.sites)} sites · {len(self._source)} window(s) · "
                f"skip_first={html.escape(str(self.meta.get('skip_first')))}")
        cols = ("site", "tokens", "mean", "std", "kurt", "min", "max", "absmax")
        rows = ["<tr>" + "".join(f"<th>{c}</th>" for c in cols) + "</tr>"]
        for s in self:
            if s.has("moments"):
                cells = [str(s.tokens)] + [num(v) for v in (s.mean, s.std, s.kurtosis, s.min, s.max, s.absmax)]
            else:
                cells = ["–"] * (len(cols) - 1)
            rows.append(f"<tr><td style='text-align:left'>{html.escape(s.name)}</td>"
                        + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
        return f"<div><p>{head}</p><table>{''.join(rows)}</table></div>"

    @property
    def sites(self) -> list[str]:
        """Site names in capture order.

        Example:
            >>> run.sites
            ['hidden_states.0', 'hidden_states.1', 'hidden_states.2']
        """
        return [s["name"] for s in self.meta.get("sites", [])]

    @property
    def steps(self) -> list[int]:
        """The ``step`` label of each committed window, in commit order.

        Example:
            >>> run.steps  # one window, committed when the capture block ended
            [1]
        """
        return list(self._source.steps)

    @property
    def rows(self) -> Sequence[WindowState]:
        """The committed windows (:class:`~probe.stats._state.WindowState`), in commit order
        (read one at a time from a file). Raw state: read numbers through the views.

        Example:
            >>> len(run.rows), run.rows[0].step
            (1, 1)
        """
        return self._source.rows if isinstance(self._source, MemorySource) else _Windows(self._source)

    @cached_property
    def total(self) -> WindowState:
        """All windows merged exactly (the raw state behind the cumulative views), read from the
        file's cumulative state. Raw state: read numbers through ``run[site]`` and ``run.cross``.

        Example:
            >>> sorted(run.total.sites["hidden_states.0"]) == sorted(set(run.stats) - {"cross"})
            True
        """
        steps = self._source.steps
        return WindowState(steps[-1] if steps else 0, {name: self._source.site_total(name) for name in self.sites},
                           self._source.cross_total())

    @property
    def stats(self) -> list[str]:
        """The statistics this run captured, e.g. ``["moments", "histogram"]``.

        Example:
            >>> run.stats
            ['moments', 'position', 'histogram', 'sample', 'cross', 'topk', 'norm']
        """
        return list(self.meta.get("stats", []))

    def __getitem__(self, name: str | int) -> SiteView:
        """The cumulative view of one site.

        Args:
            name: a site name from :attr:`sites`, or an index into it (negative counts from the end);
                a number as text is the layer number the tables show (``"5"`` is
                ``"hidden_states.5"``), else the same index (``run["-1"] is run[-1]``).

        Returns:
            The :class:`SiteView` (cached: the same object each time).

        Raises:
            ProbeError: an unknown name (the closest names are listed), an index out of range,
                or another type.

        Example:
            >>> run["hidden_states.2"] is run[-1] is run["-1"], run["1"] is run[1]
            (True, True)
        """
        if isinstance(name, int) and not isinstance(name, bool):  # the i-th site, as run.sites lists them
            if not -len(self.sites) <= name < len(self.sites):
                raise ProbeError(f"site index {name} is out of range; expected -{len(self.sites)} .. "
                                 f"{len(self.sites) - 1} (run has {len(self.sites)} sites); pass an index or a name")
            name = self.sites[name]
        if not isinstance(name, str):
            raise ProbeError(f"a site is a name or an index; got {type(name).__name__}; pass e.g. run.sites[0]")
        if name not in self._info and name.strip().lstrip("-").isdigit():
            # "5" is layer 5 as the tables and the CLI's --site show it; otherwise an index like run[5]
            k = int(name)
            return self[f"hidden_states.{k}"] if f"hidden_states.{k}" in self._info else self[k]
        if name not in self._info:
            raise ProbeError(f"unknown site {name!r}; expected one of run.sites{closest(name, self.sites)}")
        if name not in self._views:
            state = self.total.sites.get(name, {}) if "total" in self.__dict__ else self._source.site_total(name)
            self._views[name] = SiteView(name, self._info[name], state, self.meta)
            if f"{name}@grad" in self._info:
                self._views[name].grad = self[f"{name}@grad"]
        return self._views[name]

    def __iter__(self) -> Iterator[SiteView]:
        return (self[name] for name in self.sites)

    def __len__(self) -> int:
        return len(self.sites)

    @cached_property
    def cross(self) -> CrossView:
        """The layer × layer view over ``meta["cross_sites"]`` (:class:`CrossView`).

        Example:
            >>> run.cross.sites == run.sites
            True
        """
        return CrossView(self.meta.get("cross_sites", []), self._source.cross_total(), self.meta.get("stats"))

    def at(self, step: int) -> Run:
        """The window committed with label ``step`` (one window read).

        Args:
            step: a label from :attr:`steps`.

        Returns:
            A :class:`Run` holding that window alone.

        Raises:
            ProbeError: no window has that label.

        Example:
            >>> run.at(1)["hidden_states.1"].count == run["hidden_states.1"].count
            True
        """
        steps = self._source.steps
        if step not in steps:
            raise ProbeError(f"no window with step {step}; expected one of {steps}; pass a step from run.steps")
        return Run(self.meta, [self._source.window(steps.index(step))], self.path)
