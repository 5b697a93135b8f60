"""What each statistic's state is, and how two or more states combine: declared once, used everywhere.

Every statistic declares its fields (:class:`Field`: name, dtype, symbolic shape, reduction,
unit), in the spirit of torchmetrics' ``add_state(..., dist_reduce_fx=...)``. A reduction is
either elementwise (``sum``, ``min``, ``max``, ``all``) or one named exact merge over a group of
fields (``moments``: Pébay/Chan central moment sums; ``comoments``: co-moment matrices;
``argmax``: the largest value and its location; ``bottomk``: the ``k`` smallest random keys and
what they point to; ``topk``: the ``k`` largest ``|value|`` and where they sit). Merging windows (a run's cumulative state), files (``probe merge``) and, with
tensor collectives, ranks (:mod:`probe.capture.sync`) all read these declarations, and the moment algebra
below is the only one.

This module imports numpy only (the read side must not pay for importing torch); its moment
formulas are written with operators alone, so they accept numpy arrays and torch tensors alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

__all__ = ["Field", "State", "WindowState", "StatState", "SPECS", "merge_states", "merge_rows", "key_groups",
           "merge_moments", "kway_moments", "shift_sums", "argmax_better",
           "empty_state", "dims_of", "topk_order"]

Reduce = Literal["sum", "min", "max", "all", "moments", "comoments", "argmax", "bottomk", "topk"]


@dataclass(frozen=True)
class Field:
    """One state tensor: ``shape`` names its dims (``D`` channels, ``P`` positions, ``B`` histogram
    buckets, ``k`` sample slots, ``S`` cross sites; ``4`` the location tuple)."""

    name: str
    dtype: str
    shape: tuple[str, ...]
    reduce: Reduce
    #: the value of an empty state (the identity of ``reduce``)
    fill: Any
    unit: str
    #: fields with the same ``(reduce, group)`` merge together (e.g. the ``keep`` co-moments)
    group: str = ""
    #: entries past the end of the last dim that the device-side state holds and the stored one
    #: does not: a spare bucket that swallows excluded values, so the update needs no mask
    #: (always dropped by ``state_dict``, restored as ``fill`` by ``load_state_dict``)
    spare: int = 0

    def sizes(self, dims: dict[str, int], spare: bool = False) -> tuple[int, ...]:
        """The concrete shape for the symbolic ``dims`` (with the spare entries when ``spare``)."""
        shape = [int(d) if d.isdigit() else dims[d] for d in self.shape]
        if spare and self.spare:
            shape[-1] += self.spare
        return tuple(shape)


@dataclass(frozen=True)
class State:
    """A statistic's declared state."""

    name: str
    fields: tuple[Field, ...]

    def __getitem__(self, name: str) -> Field:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(name)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields)

    def dims_of(self, state: Any) -> dict[str, int]:
        """The sizes of the symbolic dims of one (non-empty, stored) ``state``."""
        dims: dict[str, int] = {}
        for f in self.fields:
            for d, size in zip(f.shape, np.shape(state[f.name])):
                if not d.isdigit():
                    dims[d] = int(size)
        return dims

    @property
    def bottomk_key(self) -> str | None:
        """The key field of the ``bottomk`` group (its first field), or ``None`` without one."""
        return next((f.name for f in self.fields if f.reduce == "bottomk"), None)

    @property
    def symbols(self) -> tuple[str, ...]:
        """The symbolic dims of the fields (``D``, ``P``, ...), sorted."""
        return tuple(sorted({d for f in self.fields for d in f.shape if not d.isdigit()}))

    def groups(self) -> list[tuple[str, list[Field]]]:
        """``(reduce, fields)`` per merge unit, in declaration order (elementwise fields alone)."""
        out: dict[tuple[str, str], list[Field]] = {}
        for f in self.fields:
            key = (f.reduce, f.group) if f.reduce in _GROUPED else (f.reduce, "=" + f.name)
            out.setdefault(key, []).append(f)
        return [(k[0], v) for k, v in out.items()]


#: one statistic's state: field name -> array, as declared in :data:`SPECS`; ``{}`` when the
#: statistic recorded nothing in the window
StatState = dict[str, Any]


@dataclass
class WindowState:
    """One committed window, the value that capture, sync, store and results exchange.

    Attributes:
        step: the window's label (the number of forwards, or the step given to ``snapshot``).
        sites: per site name, per statistic name, that statistic's state (:data:`StatState`).
        cross: the cross-layer statistic's state (``{}`` when not captured).
    """

    step: int
    sites: dict[str, dict[str, StatState]] = field(default_factory=dict)
    cross: StatState = field(default_factory=dict)

    def state(self, site: str, kind: str) -> StatState:
        """Statistic ``kind``'s state at ``site``; ``{}`` when it recorded nothing there."""
        return self.sites.get(site, {}).get(kind) or {}


_GROUPED = ("moments", "comoments", "argmax", "bottomk", "topk")
F64, F32, I64, BOOL = "float64", "float32", "int64", "bool"
_INF = float("inf")

MOMENTS = State("moments", (
    Field("n", F64, ("D",), "moments", 0.0, "finite kept values per channel"),
    Field("mean", F64, ("D",), "moments", 0.0, "activation units"),
    Field("m2", F64, ("D",), "moments", 0.0, "sum of (x - mean)^2, units^2"),
    Field("m3", F64, ("D",), "moments", 0.0, "sum of (x - mean)^3, units^3"),
    Field("m4", F64, ("D",), "moments", 0.0, "sum of (x - mean)^4, units^4"),
    Field("min", F32, ("D",), "min", _INF, "activation units (+inf where empty)"),
    Field("max", F32, ("D",), "max", -_INF, "activation units (-inf where empty)"),
    Field("nan", I64, (), "sum", 0, "NaN kept values"),
    Field("posinf", I64, (), "sum", 0, "+inf kept values"),
    Field("neginf", I64, (), "sum", 0, "-inf kept values"),
    Field("tokens", I64, (), "sum", 0, "kept tokens"),
    Field("absmax", F32, (), "argmax", -1.0, "largest |x|, activation units (-1 where empty)"),
    Field("absmax_at", I64, ("4",), "argmax", -1, "(row, position, channel, token id) of absmax"),
    Field("large", I64, ("D",), "sum", 0, "values with |x| >= 6 per channel"),
))

POSITION = State("position", (
    Field("tokens", I64, ("P",), "sum", 0, "real tokens at each absolute position"),
    Field("n", F64, ("P",), "moments", 0.0, "finite values (all channels) at each position"),
    Field("mean", F64, ("P",), "moments", 0.0, "activation units"),
    Field("m2", F64, ("P",), "moments", 0.0, "sum of (x - mean)^2, units^2"),
    Field("absmax", F32, ("P",), "max", -_INF, "largest |x| at each position (-inf where empty)"),
    Field("overflow", I64, (), "sum", 0, "real tokens at positions >= P"),
))

HISTOGRAM = State("histogram", (
    Field("counts", I64, ("B",), "sum", 0, "finite kept values per float-bit bucket", spare=1),
    Field("lossless", BOOL, (), "all", True, "no value had mantissa bits below the top m"),
))

SAMPLE = State("sample", (
    Field("key", F64, ("k",), "bottomk", _INF, "uniform random key in [0, 1) (inf: empty slot)"),
    Field("row", I64, ("k",), "bottomk", -1, "sequence index on the capturing rank"),
    Field("position", I64, ("k",), "bottomk", -1, "absolute token position"),
    Field("channel", I64, ("k",), "bottomk", -1, "channel index"),
    Field("token", I64, ("k",), "bottomk", -1, "token id (-1 unknown)"),
    Field("value", F32, ("k",), "bottomk", float("nan"), "activation units"),
))

CROSS = State("cross", tuple(
    [f for v in ("keep", "all") for f in (
        Field(f"{v}_n", F64, (), "comoments", 0.0, "(token, channel) observations", v),
        Field(f"{v}_mean", F64, ("S",), "comoments", 0.0, "activation units", v),
        Field(f"{v}_c", F64, ("S", "S"), "comoments", 0.0, "co-moment sums, units^2", v),
    )] + [Field("skipped_tokens", I64, (), "sum", 0, "tokens of forwards left out (cross_budget)")]
    + [f for v in ("keep", "all") for f in (
        Field(f"{v}_cos_n", F64, (), "sum", 0.0, "tokens finite with a non-zero norm at every site"),
        Field(f"{v}_cos", F64, ("S", "S"), "sum", 0.0, "sum over tokens of cos(h_i, h_j)"),
    )]
    + [Field("keep_cos_hist", I64, ("S", "C"), "sum", 0,
             "kept tokens per float-bit bucket of 1 - cos(h_l, h_l+1), row l (C = 2**12; last row 0)", spare=1)]
))

TOPK = State("topk", (
    Field("value", F32, ("k",), "topk", float("nan"), "activation units, largest |value| first (NaN: empty slot)"),
    Field("row", I64, ("k",), "topk", -1, "sequence index on the capturing rank"),
    Field("position", I64, ("k",), "topk", -1, "absolute token position"),
    Field("channel", I64, ("k",), "topk", -1, "channel index"),
    Field("token", I64, ("k",), "topk", -1, "token id (-1 unknown)"),
))

NORM = State("norm", (
    Field("n", F64, (), "moments", 0.0, "kept tokens with a finite norm"),
    Field("mean", F64, (), "moments", 0.0, "L2 norm, activation units"),
    Field("m2", F64, (), "moments", 0.0, "sum of (norm - mean)^2, units^2"),
    Field("m3", F64, (), "moments", 0.0, "sum of (norm - mean)^3, units^3"),
    Field("m4", F64, (), "moments", 0.0, "sum of (norm - mean)^4, units^4"),
    Field("min", F32, (), "min", _INF, "smallest norm (+inf where empty)"),
    Field("max", F32, (), "max", -_INF, "largest norm (-inf where empty)"),
    Field("nonfinite", I64, (), "sum", 0, "kept tokens whose norm is not finite"),
    Field("counts", I64, ("H",), "sum", 0, "norms per float-bit bucket (the positive half, H = 2**(8+m))",
          spare=1),
    Field("pos_n", F64, ("P",), "moments", 0.0, "real tokens with a finite norm at each position", "pos"),
    Field("pos_mean", F64, ("P",), "moments", 0.0, "mean L2 norm at each position", "pos"),
    Field("pos_m2", F64, ("P",), "moments", 0.0, "sum of (norm - mean)^2 at each position", "pos"),
    Field("unit_n", F64, (), "sum", 0.0, "kept tokens with a finite, non-zero norm"),
    Field("unit_sum", F64, ("D",), "sum", 0.0, "sum of the unit vectors h / ||h||"),
))

#: linear bins of the router statistics' distributions (routing entropy / ln E, top-k weights), over [0, 1]
ROUTER_BINS = 64

ROUTER = State("router", (
    Field("tokens", I64, (), "sum", 0, "real tokens routed"),
    Field("counts", I64, ("E",), "sum", 0, "(real token, top-k slot) assignments per expert"),
    Field("weight_sum", F64, ("E",), "sum", 0.0, "sum of the top-k routing weights given to each expert"),
    Field("prob_sum", F64, ("E",), "sum", 0.0, "sum of softmax(router logits) per expert"),
    Field("entropy_n", F64, (), "moments", 0.0, "real tokens with finite router logits", "entropy"),
    Field("entropy_mean", F64, (), "moments", 0.0, "routing entropy of softmax(logits), nats", "entropy"),
    Field("entropy_m2", F64, (), "moments", 0.0, "sum of (entropy - mean)^2, nats^2", "entropy"),
    Field("entropy_hist", I64, ("R",), "sum", 0, "real tokens per bin of entropy / ln E over [0, 1] (R bins)"),
    Field("weight_hist", I64, ("R",), "sum", 0, "top-k routing weights per bin over [0, 1] (R bins)"),
    Field("nonfinite", I64, (), "sum", 0, "real tokens with a non-finite router logit (left out of everything)"),
    Field("rank_counts", I64, ("W", "E"), "sum", 0, "counts per capturing rank: row r is rank r's under "
          "torch.distributed (W = world size); one row in one process"),
))

EXPERTS = State("experts", (
    Field("tokens", I64, ("E",), "sum", 0, "real tokens routed to each expert (the rows of its input)"),
    Field("n", F64, ("E", "D"), "moments", 0.0, "finite values per expert and input channel"),
    Field("mean", F64, ("E", "D"), "moments", 0.0, "activation units"),
    Field("m2", F64, ("E", "D"), "moments", 0.0, "sum of (x - mean)^2, units^2"),
    Field("absmax", F32, ("E", "D"), "max", 0.0, "largest finite |x| per expert and channel (0 where empty)"),
    Field("nonfinite", I64, ("E",), "sum", 0, "non-finite values in each expert's input (left out)"),
))

#: linear bins of the attention entropy histogram (entropy / ln(allowed keys)), over [0, 1]
ATTENTION_BINS = 64
#: the first keys whose attention mass is kept (the sink: key 0 .. ATTENTION_SINKS - 1 of each query)
ATTENTION_SINKS = 4

ATTENTION = State("attention", (
    Field("tokens", I64, (), "sum", 0, "real query tokens"),
    Field("maxlogit", F32, ("H",), "argmax", -_INF, "largest q.k * scaling over real queries and allowed keys "
          "(QK-Clip's MaxLogit; -inf where empty)"),
    Field("maxlogit_at", I64, ("H", "4"), "argmax", -1, "(row, query position, key position, query token id)"),
    Field("entropy_n", F64, ("H",), "moments", 0.0, "real queries with finite logits", "entropy"),
    Field("entropy_mean", F64, ("H",), "moments", 0.0, "attention entropy -sum p ln p, nats", "entropy"),
    Field("entropy_m2", F64, ("H",), "moments", 0.0, "sum of (entropy - mean)^2, nats^2", "entropy"),
    Field("entropy_m3", F64, ("H",), "moments", 0.0, "sum of (entropy - mean)^3, nats^3", "entropy"),
    Field("entropy_m4", F64, ("H",), "moments", 0.0, "sum of (entropy - mean)^4, nats^4", "entropy"),
    Field("entropy_hist", I64, ("H", "R"), "sum", 0, "real queries per bin of entropy / ln(allowed keys) over [0, 1]"),
    Field("sink", F64, ("H", "K"), "sum", 0.0, "sum over real queries of the attention probability on the "
          "query's j-th allowed key (j < K: the first real tokens)"),
    Field("nonfinite", I64, ("H",), "sum", 0, "real queries with a non-finite logit or no allowed key (left out)"),
))

#: declared state of every statistic, by name
SPECS: dict[str, State] = {s.name: s for s in (MOMENTS, POSITION, HISTOGRAM, SAMPLE, CROSS, TOPK, NORM, ROUTER,
                                                EXPERTS, ATTENTION)}
#: the statistics probe declares itself (every process knows them); others are registered at run time
BUILTIN = frozenset(SPECS)


def spec_json(spec: State) -> dict[str, Any]:
    """``spec`` as plain JSON data (what :func:`spec_from_json` reads back): how a statistic
    registered in one process is declared to another (probe's writer process)."""
    return {"name": spec.name, "fields": [dict(vars(f), shape=list(f.shape)) for f in spec.fields]}


def spec_from_json(data: dict[str, Any]) -> State:
    """The :class:`State` that :func:`spec_json` wrote."""
    return State(str(data["name"]), tuple(Field(**{**f, "shape": tuple(f["shape"])}) for f in data["fields"]))


def dims_of(kind: str, state: dict[str, Any]) -> dict[str, int]:
    """The sizes of the symbolic dims of one (non-empty) ``state``."""
    return SPECS[kind].dims_of(state)


def empty_state(kind: str, dims: dict[str, int]) -> dict[str, np.ndarray]:
    """The identity state of ``kind`` with the given dims (what a window that saw nothing holds)."""
    return {f.name: np.full(f.sizes(dims), f.fill, dtype=f.dtype) for f in SPECS[kind].fields}


# ------------------------------------------------------------------------------ the moment algebra
def _clamp_one(n):
    return n.clamp(min=1) if hasattr(n, "clamp") else np.clip(n, 1, None)


def merge_moments(a: tuple, b: tuple) -> tuple:
    """Combine central moment sums ``(n, mean, M2[, M3, M4])`` of two disjoint sets.

    Pébay (2008), eqs. 3.1 and 3.2 (Chan et al. 1979 for ``M2``): exact algebra, written with
    operators only, so it takes tensors or numpy arrays alike. An empty side (``n == 0``) leaves
    the other untouched. Tuples of length 3 merge to order 2, of length 5 to order 4.
    """
    na, ma, m2a = a[:3]
    nb, mb, m2b = b[:3]
    n = na + nb
    safe = _clamp_one(n)
    delta = mb - ma
    dn = delta / safe
    nab = na * nb
    mean = ma + nb * dn
    m2 = m2a + m2b + delta * dn * nab
    if len(a) == 3:
        return n, mean, m2
    m3a, m4a = a[3:]
    m3b, m4b = b[3:]
    dn2 = dn * dn
    m3 = m3a + m3b + dn2 * delta * nab * (na - nb) + 3 * dn * (na * m2b - nb * m2a)
    m4 = (
        m4a
        + m4b
        + dn2 * dn2 * nab * (na * na - nab + nb * nb) * safe
        + 6 * dn2 * (na * na * m2b + nb * nb * m2a)
        + 4 * dn * (na * m3b - nb * m3a)
    )
    return n, mean, m2, m3, m4


def shift_sums(n, delta, sums: tuple) -> tuple:
    """Central sums ``(M2[, M3, M4])`` of a set with ``n`` values about a point ``delta`` *below*
    its mean (the same binomial expansion as the k-way merge; works on tensors and arrays)."""
    m2 = sums[0] + n * delta**2
    if len(sums) == 1:
        return (m2,)
    m3 = sums[1] + 3 * delta * sums[0] + n * delta**3
    m4 = sums[2] + 4 * delta * sums[1] + 6 * delta**2 * sums[0] + n * delta**4
    return m2, m3, m4


def kway_moments(parts: list[tuple], axis: int = 0) -> tuple:
    """Exact merge of ``K`` moment states ``(n, mean, M2[, M3, M4])`` stacked along ``axis``:
    ``mean = Σ n_i mean_i / N`` and each ``M_p`` the sum of the parts' sums shifted to that mean
    (:func:`shift_sums`). Float64 numpy."""
    n = np.stack([np.asarray(p[0], np.float64) for p in parts], axis)
    mean = np.stack([np.asarray(p[1], np.float64) for p in parts], axis)
    total = n.sum(axis)
    mu = (n * mean).sum(axis) / np.clip(total, 1, None)
    delta = np.where(n > 0, mean - np.expand_dims(mu, axis), 0.0)
    sums = tuple(np.stack([np.asarray(p[j], np.float64) for p in parts], axis) for j in range(2, len(parts[0])))
    return (total, mu, *(s.sum(axis) for s in shift_sums(n, delta, sums)))


def _kway_comoments(parts: list[tuple]) -> tuple:
    """Exact merge of co-moment states ``(n, mean[S], C[S, S])``: ``C = Σ C_i + n_i δ_i δ_iᵀ``."""
    n = np.array([float(p[0]) for p in parts])
    total = n.sum()
    mu = sum(n_i * np.asarray(p[1], np.float64) for n_i, p in zip(n, parts)) / max(total, 1.0)
    c = 0.0
    for n_i, p in zip(n, parts):
        d = np.asarray(p[1], np.float64) - mu if n_i > 0 else np.zeros_like(mu)
        c = c + np.asarray(p[2], np.float64) + n_i * np.outer(d, d)
    return np.float64(total), mu, np.asarray(c, np.float64)


def argmax_better(value: Any, at: Any, old: Any, old_at: Any) -> Any:
    """Whether ``(value, at)`` beats ``(old, old_at)`` in the ``argmax`` reduction: the larger value
    wins; a tie goes to the earlier ``(row, position, channel)`` of a filled entry (``old_at[...,
    0] >= 0``), so merges commute. Operators only (numpy arrays or tensors, any leading dims,
    ``at[..., 4]``): the capture's update, the file merge and the rank merge share this rule."""
    earlier = at[..., 2] < old_at[..., 2]
    for i in (1, 0):
        earlier = (at[..., i] < old_at[..., i]) | ((at[..., i] == old_at[..., i]) & earlier)
    return (value > old) | ((value == old) & (old_at[..., 0] >= 0) & earlier)


def _argmax(values: list, ats: list) -> tuple:
    """The best ``(value, at)`` of the parts by :func:`argmax_better`, elementwise over any leading
    dims (one argmax per head of the attention statistic)."""
    best_v, best_at = np.asarray(values[0]), np.asarray(ats[0])
    for v, at in zip(values[1:], ats[1:]):
        v, at = np.asarray(v), np.asarray(at)
        better = np.asarray(argmax_better(v, at, best_v, best_at))
        best_v, best_at = np.where(better, v, best_v), np.where(better[..., None], at, best_at)
    return best_v, best_at


def bottomk_order(keys: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` smallest of the concatenated ``keys`` in increasing key order (a stable
    sort: equal keys keep their input order)."""
    if keys.shape[0] > 4 * k:
        part = np.argpartition(keys, k - 1)[:k]
        return part[np.lexsort((part, keys[part]))]
    return np.argsort(keys, kind="stable")[:k]


def _bottomk(fields: list[Field], states: list[dict], order: np.ndarray | None = None) -> dict:
    key = fields[0].name
    keys = np.concatenate([np.asarray(s[key], np.float64) for s in states])
    k = np.shape(states[0][key])[0]
    if order is None:
        order = bottomk_order(keys, k)
    empty = np.isinf(keys[order])
    out = {}
    for f in fields:
        v = np.concatenate([np.asarray(s[f.name]) for s in states])[order].astype(f.dtype)
        if f.name != key:
            v[empty] = f.fill
        out[f.name] = v
    return out


def topk_order(value: np.ndarray, row: np.ndarray, position: np.ndarray, channel: np.ndarray) -> np.ndarray:
    """Indices of the entries in top-k order: largest ``|value|`` first, ties to the earliest
    ``(row, position, channel)``, empty slots (NaN value) last."""
    value = np.asarray(value, np.float64)
    empty = np.isnan(value)
    mag = np.where(empty, 0.0, np.abs(value))
    return np.lexsort((channel, position, row, -mag, empty))


def _topk(fields: list[Field], states: list[dict]) -> dict:
    cols = {f.name: np.concatenate([np.asarray(s[f.name]) for s in states]) for f in fields}
    k = np.shape(states[0]["value"])[0]
    order = topk_order(cols["value"], cols["row"], cols["position"], cols["channel"])[:k]
    empty = np.isnan(cols["value"][order])
    out = {}
    for f in fields:
        v = cols[f.name][order].astype(f.dtype)
        v[empty] = f.fill
        out[f.name] = v
    return out


def _complete(spec: State, state: dict) -> dict:
    """``state`` with the fields it lacks (declared after the file was written, e.g. the cross
    cosines in a schema-1 file) as their identity, sized from the fields it has."""
    missing = [f for f in spec.fields if f.name not in state]
    if not missing:
        return state
    dims: dict[str, int] = {}
    for f in spec.fields:
        if f.name in state:
            for d, size in zip(f.shape, np.shape(state[f.name])):
                dims.setdefault(d, int(size))
    out = dict(state)
    for f in missing:
        shape = tuple(int(d) if d.isdigit() else dims.get(d, 0) for d in f.shape)
        out[f.name] = np.full(shape, f.fill, dtype=f.dtype)
    return out


def _same_ranks(spec: State, states: list[dict]) -> list[dict]:
    """``states`` with every per-rank field (dim ``W``, leading) padded with zero rows to the most
    ranks among them: runs captured at other world sizes merge rank by rank."""
    fields = [f for f in spec.fields if f.shape[:1] == ("W",)]
    if not fields or len(states) < 2:
        return states
    out = []
    for s in states:
        s = dict(s)
        for f in fields:
            most = max(np.shape(t[f.name])[0] for t in states)
            a = np.asarray(s[f.name])
            if a.shape[0] < most:
                s[f.name] = np.concatenate([a, np.zeros((most - a.shape[0], *a.shape[1:]), a.dtype)])
        out.append(s)
    return out


def merge_states(kind: str, states: list[dict[str, Any]], sample_order: np.ndarray | None = None) -> dict:
    """Exact merge of several states of statistic ``kind`` (numpy; empty dicts are skipped).

    Args:
        kind: a name in :data:`SPECS`.
        states: ``{field: array}`` per part.
        sample_order: for ``sample``, a precomputed :func:`bottomk_order` of the concatenated
            keys (sites that share keys share it).

    Returns:
        ``{field: array}``, or ``{}`` when every part is empty.

    Raises:
        ProbeError: parts whose shapes differ (other ``histogram_bits``, ``max_positions``,
            ``sample_size`` or sites), named by the first differing field.
    """
    states = [s for s in states if s]
    if not states:
        return {}
    spec = SPECS[kind]
    states = _same_ranks(spec, [_complete(spec, s) for s in states])
    first = states[0]
    for s in states[1:]:
        for f in spec.fields:
            if np.shape(s[f.name]) != np.shape(first[f.name]):
                from ..errors import ProbeError

                raise ProbeError(f"{kind}.{f.name} has shape {np.shape(s[f.name])} in one part and "
                                 f"{np.shape(first[f.name])} in another; expected equal shapes (same "
                                 "histogram_bits, max_positions, sample_size and sites); merge runs "
                                 "captured with the same options")
    if len(states) == 1:
        return {f.name: np.array(first[f.name], dtype=f.dtype) for f in spec.fields}
    out: dict[str, np.ndarray] = {}
    for reduce, fields in spec.groups():
        names = [f.name for f in fields]
        cols = [[np.asarray(s[n]) for s in states] for n in names]
        if reduce == "sum":
            out[names[0]] = np.sum(np.stack(cols[0]), 0, dtype=fields[0].dtype)
        elif reduce == "min":
            out[names[0]] = np.min(np.stack(cols[0]), 0)
        elif reduce == "max":
            out[names[0]] = np.max(np.stack(cols[0]), 0)
        elif reduce == "all":
            out[names[0]] = np.logical_and.reduce(np.stack(cols[0]), 0)
        elif reduce == "moments":
            merged = kway_moments([tuple(c[i] for c in cols) for i in range(len(states))])
            out.update(zip(names, merged))
        elif reduce == "comoments":
            merged = _kway_comoments([tuple(c[i] for c in cols) for i in range(len(states))])
            out.update(zip(names, merged))
        elif reduce == "argmax":
            out.update(zip(names, _argmax(cols[0], cols[1])))
        elif reduce == "bottomk":
            out.update(_bottomk(fields, states, sample_order))
        elif reduce == "topk":
            out.update(_topk(fields, states))
        else:  # pragma: no cover - declarations use the names above
            raise ValueError(reduce)
    return {f.name: np.asarray(out[f.name], dtype=f.dtype) for f in spec.fields}


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a is b or (a.shape == b.shape and np.array_equal(a, b))


def key_groups(keys: list[np.ndarray]) -> list[int]:
    """For each key array, the index of the first equal one: sites whose samples saw the same
    forwards hold equal keys (and coordinates), which are then stored and merged once."""
    reps: dict[tuple, list[int]] = {}
    out = []
    for i, k in enumerate(keys):
        k = np.asarray(k)
        head = (k.shape, k.reshape(-1)[:4].tobytes())  # random keys: the head tells them apart
        for r in reps.setdefault(head, []):
            if _same(np.asarray(keys[r]), k):
                out.append(r)
                break
        else:
            reps[head].append(i)
            out.append(i)
    return out


def merge_rows(rows: Sequence[WindowState], cross_sites=()) -> WindowState:
    """Exact merge of several windows into one (``step`` of the last). Sites whose samples hold
    equal keys share one bottom-k order."""
    if not rows:
        return WindowState(0)
    names: dict[str, None] = {}
    for row in rows:
        names.update(dict.fromkeys(row.sites))
    sites: dict[str, dict] = {}
    reps: list[list[np.ndarray]] = [[] for _ in rows]  # per row: distinct sample key arrays seen
    orders: dict[tuple, np.ndarray] = {}
    for name in names:
        kinds: dict[str, None] = {}
        for row in rows:
            kinds.update(dict.fromkeys(row.sites.get(name, {})))
        per = sites[name] = {}
        for kind in kinds:
            states = [row.state(name, kind) for row in rows]
            order = None
            key = SPECS[kind].bottomk_key if kind in SPECS else None
            if key is not None and sum(bool(s) for s in states) > 1:
                sig = []
                for r, s in enumerate(states):
                    if not s:
                        continue
                    for j, rep in enumerate(reps[r]):
                        if _same(rep, s[key]):
                            sig.append((r, j))
                            break
                    else:
                        reps[r].append(s[key])
                        sig.append((r, len(reps[r]) - 1))
                sig_t = tuple(sig)
                if sig_t not in orders:
                    keys = np.concatenate([s[key] for s in states if s])
                    orders[sig_t] = bottomk_order(keys, np.shape(next(s for s in states if s)[key])[0])
                order = orders[sig_t]
            per[kind] = merge_states(kind, states, order)
    cross = merge_states("cross", [row.cross for row in rows])
    return WindowState(rows[-1].step, sites, cross)
