"""The protocol every statistic follows, the token metadata they share, and the moment algebra.

A statistic is its sufficient statistics: ``update`` folds in a chunk of activations, ``merge``
folds in another instance of the same statistic (another window, rank or file), and the state
round-trips through ``state_dict`` / ``load_state_dict`` as plain tensors. State lives on the
device of the activations it saw; nothing in ``update`` synchronises with the host.
"""

from __future__ import annotations

import contextlib
import math
import threading
import warnings
from dataclasses import dataclass, field
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Protocol

import numpy as np
import torch
from torch import Tensor

from ._state import SPECS, Field, State, merge_moments, merge_states

__all__ = ["Tokens", "Stat", "StatBase", "TORCH_DTYPES", "BatchedStat", "Finite", "Dense", "merge_moments", "SPECS",
           "central_sums", "dense", "finite", "host_reads", "host_checks", "scratch", "release_scratch",
           "run_compiled", "stacked", "pow2", "power_of_two", "scaled_central_sums", "tiny_spread", "finite_host", "TINY_SPREAD",
           "wide_sums", "wide"]

if TYPE_CHECKING:  # typing.Self is Python 3.11+
    from typing_extensions import Self


@dataclass(frozen=True)
class Tokens:
    """Per-token metadata for the ``n`` tokens of a chunk (all 1-D, on the activation's device).

    ``valid`` marks real (unpadded) tokens; ``keep`` additionally drops the first ``skip_first``
    real tokens of each sequence. ``position`` is the absolute position, ``row`` the global index
    of the sequence since the capture began, ``token`` the input id (``-1`` when unknown), and
    ``offset`` the index of the chunk's first token within the forward pass.
    """

    valid: Tensor
    keep: Tensor
    position: Tensor
    row: Tensor
    token: Tensor
    forward: int
    seed: int = 0
    offset: int = 0
    #: an upper bound on the tokens with ``valid & ~keep`` (the skipped head), known on the host;
    #: ``-1`` when unknown (e.g. user-supplied ``position_ids`` may restart inside a sequence)
    head_bound: int = -1
    #: per-forward memo shared by every site (e.g. the sample's key selection)
    cache: dict = field(default_factory=dict, compare=False, repr=False)
    #: per-chunk memo shared by the statistics that read the same chunk (see :func:`finite`)
    local: dict = field(default_factory=dict, compare=False, repr=False)

    def slice(self, start: int, stop: int) -> Tokens:
        return Tokens(
            self.valid[start:stop],
            self.keep[start:stop],
            self.position[start:stop],
            self.row[start:stop],
            self.token[start:stop],
            self.forward,
            self.seed,
            self.offset + start,
            -1,
            self.cache,
            {},
        )


#: torch dtype of each declared numpy dtype name
TORCH_DTYPES: dict[str, torch.dtype] = {"float64": torch.float64, "float32": torch.float32,
                                        "int64": torch.int64, "bool": torch.bool}


class Stat(Protocol):
    """What the capture engine calls on a per-site statistic (``probe.capture.engine`` and
    ``probe.capture.kernels``); :class:`StatBase` implements all of it from the declared
    :attr:`spec`, so a new statistic writes only its update.

    Shapes: ``x[G, n, D]`` is one chunk of ``n`` tokens of ``G`` sites that saw the same tokens
    (``tokens`` describes them, 1-D ``[n]``); state tensors have the shapes of :attr:`spec`'s
    fields with its symbolic dims made concrete by :meth:`dims` (plus any declared spare
    entries on the device). The cross-site kind (:class:`probe.stats.cross.Cross`, ``per_site =
    False``) is fed by ``hold(index, x[n, D], tokens)`` and ``finish()`` at the end of a forward
    instead of the three update methods, and shares the rest.
    """

    name: ClassVar[str]
    #: the declared state (fields, dtypes, shapes, fills, reductions)
    spec: ClassVar[State]
    #: ``True`` when the update takes token chunks; ``False`` when it wants the whole forward
    chunked: ClassVar[bool]
    #: ``False`` for the cross-site kind (one instance spans all sites)
    per_site: ClassVar[bool]
    #: run the update as one torch.compile graph: ``None`` = on accelerators only
    compile: bool | None

    @property
    def empty(self) -> bool:
        """``True`` until the first update (or load) allocates the state."""
        ...

    @classmethod
    def create(cls, *, histogram_bits: int, max_positions: int, sample_size: int) -> Stat:
        """A fresh, empty statistic for one site of a window, from the capture's options."""
        ...

    @classmethod
    def update_group(cls, stats: list[Any], x: Tensor, tokens: Tokens) -> None:
        """Fold ``x[G, n, D]`` into ``stats`` (``G`` statistics of this class, one per site)."""
        ...

    @classmethod
    def partial(cls, stat: Any, x: Tensor, tokens: Tokens) -> Any:
        """Phase one of a two-phase update of ``stat`` by ``x[1, n, D]``: a partial result for
        :meth:`fold` (or ``None`` when the update is already done)."""
        ...

    @classmethod
    def fold(cls, stats: list[Any], parts: list[Any]) -> None:
        """Phase two: fold ``parts[i]`` (from :meth:`partial`) into ``stats[i]``, batched."""
        ...

    def merge(self, other: Any) -> None:
        """Fold in another instance's state exactly (another window, rank or file)."""
        ...

    def state_dict(self) -> dict[str, Tensor]:
        """The stored state: ``{field: tensor}`` in :attr:`spec`'s shapes, ``{}`` when empty."""
        ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace the state by a stored one (``{}``: empty)."""
        ...

    def to(self, device: torch.device | str) -> Any:
        """Move the state to ``device``; returns ``self``."""
        ...


class StatBase:
    """Everything but the update, derived from the declared :attr:`spec`: allocation of the empty
    state (:meth:`dims` gives the sizes), ``state_dict``/``load_state_dict`` (declared spare
    entries dropped and restored), the exact ``merge`` and ``to``.

    A subclass sets ``name``, ``spec`` (a :class:`~probe.stats._state.State`), ``chunked``, and
    defines :meth:`dims` and ``update_group`` (or ``partial``/``fold``); the field order, torch
    dtypes and spare entries are read from ``spec`` once, when the class is created.
    """

    name: ClassVar[str] = ""
    chunked: ClassVar[bool] = True
    per_site: ClassVar[bool] = True
    #: the declared state (fields, dtypes, shapes, reductions); ``_fields`` is its field order
    spec: ClassVar[State]
    _fields: ClassVar[tuple[str, ...]] = ()
    #: ``(field, torch dtype)`` per declared field, in order
    _layout: ClassVar[tuple[tuple[Field, torch.dtype], ...]] = ()
    #: ``(field, spare, fill)`` of the fields with spare device-side entries
    _spares: ClassVar[tuple[tuple[str, int, Any], ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        spec = cls.__dict__.get("spec")
        if spec is not None:
            cls._fields = spec.names
            cls._layout = tuple((f, TORCH_DTYPES[f.dtype]) for f in spec.fields)
            cls._spares = tuple((f.name, f.spare, f.fill) for f in spec.fields if f.spare)

    def __init__(self) -> None:
        self._state: dict[str, Tensor] | None = None
        #: run the update as one torch.compile graph: ``None`` = on accelerators only
        self.compile: bool | None = None

    @classmethod
    def create(cls, *, histogram_bits: int, max_positions: int, sample_size: int) -> Any:
        """A fresh statistic from the capture's options (this default takes none of them)."""
        return cls()

    def dims(self, x: Tensor) -> dict[str, int]:
        """The sizes of :attr:`spec`'s symbolic dims for activations like ``x[..., n, D]``."""
        raise NotImplementedError

    def _adopt(self, dims: dict[str, int]) -> None:
        """Take the options a loaded state implies (e.g. the bucket count's ``m``) from its dims."""

    def _allocate(self, dims: dict[str, int], device: torch.device) -> None:
        """The empty state (every field at its declared ``fill``) with the given dims."""
        self._state = {f.name: torch.full(f.sizes(dims, spare=True), f.fill, dtype=dtype, device=device)
                       for f, dtype in self._layout}

    def compiled(self, x: Tensor) -> bool:
        """Whether this update of ``x`` runs compiled (see :func:`run_compiled`)."""
        wanted = x.device.type != "cpu" if self.compile is None else self.compile
        return wanted and COMPILE_BACKEND is not None

    @property
    def empty(self) -> bool:
        """``True`` until the first update (or load) allocates the state."""
        return self._state is None

    def state_dict(self) -> dict[str, Tensor]:
        if self._state is None:
            return {}
        out = dict(self._state)
        for name, spare, _ in self._spares:
            out[name] = out[name][..., :-spare].clone()
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not state:
            self._state = None
            return
        missing = [f for f in self._fields if f not in state]
        if missing:
            from ..errors import FileFormatError

            raise FileFormatError(
                f"{self.name} state lacks {missing}; expected {list(self._fields)}; "
                "the file is damaged or not a probe run"
            )
        self._adopt(self.spec.dims_of(state))
        loaded = {f.name: torch.as_tensor(state[f.name]).to(dtype) for f, dtype in self._layout}
        for name, spare, fill in self._spares:
            v = loaded[name]
            loaded[name] = torch.cat((v, v.new_full((*v.shape[:-1], spare), fill)), -1)
        self._state = loaded

    def to(self, device: torch.device | str) -> Any:
        if self._state is not None:
            self._state = {k: v.to(device) for k, v in self._state.items()}
        return self

    def merge(self, other: Any) -> None:
        """Fold in another instance's state (another window, rank or file), exactly, through the
        declared reductions of :data:`spec` (:func:`probe.stats._state.merge_states`). The result
        stays on this statistic's device (or the other's, when this one is empty)."""
        if other._state is None:
            return
        mine = self.state_dict()
        device = next(iter((mine or other.state_dict()).values())).device
        parts = [{k: v.detach().cpu().numpy() for k, v in st.state_dict().items()} for st in (self, other)]
        merged = merge_states(self.name, parts)
        self.load_state_dict({k: torch.from_numpy(v).to(device) for k, v in merged.items()})

    @property
    def s(self) -> dict[str, Tensor]:
        assert self._state is not None
        return self._state

    def update(self, x: Tensor, tokens: Tokens) -> None:
        """Fold one site's chunk ``x[n, D]`` in (:meth:`update_group` with ``G = 1``)."""
        type(self).update_group([self], x.unsqueeze(0), tokens)

    @classmethod
    def update_group(cls, stats: list[Self], x: Tensor, tokens: Tokens) -> None:
        """Fold ``x[G, n, D]`` into ``stats`` (``G`` statistics of this class, one per site, all
        over the same tokens), without reading the device from the host."""
        raise NotImplementedError(f"{cls.__name__} must define update_group")

    def share_key(self) -> tuple | None:
        """For a statistic whose :meth:`partial` result is a function of the chunk and its tokens
        alone, what else it depends on (options such as a size): sites that read one tensor over
        the same tokens and agree on this key take one partial result (``StatEngine._run_sites``).
        ``None`` (this default): computed for every site."""
        return None

    @classmethod
    def partial(cls, stat: Self, x: Tensor, tokens: Tokens) -> Any:
        """Phase one of a two-phase update of ``stat`` by chunk ``x[1, n, D]`` (see
        :meth:`BatchedStat.partial`); this default does the whole update now."""
        cls.update_group([stat], x, tokens)
        return None

    @classmethod
    def fold(cls, stats: list[Self], parts: list[Any]) -> None:
        """Phase two (see :meth:`BatchedStat.fold`); nothing is left to do by default."""

    def _init_like(self, x: Tensor) -> None:
        """Allocate the empty state for activations like ``x[..., n, D]``."""
        self._allocate(self.dims(x), x.device)

    @staticmethod
    def _ready(stats: list, x: Tensor) -> bool:
        """Allocate the states still missing; ``False`` for an empty chunk, which adds nothing
        (a shape check: no sync)."""
        if x.numel() == 0:
            return False
        for stat in stats:
            if stat._state is None:
                stat._init_like(x)
        return True


def stacked(parts: list[Tensor]) -> Tensor:
    """``torch.stack(parts)``, without the copy when ``parts`` are already the rows, in order, of
    one contiguous tensor (as the states a batched update handed back are: ``unbind`` views of
    its result). Then the returned tensor is that one (it aliases ``parts``), so that updating
    ``G`` sites' states every forward does not copy them (a histogram's 65,536 counts per site
    cost more to stack than a decode step's statistics cost to compute). Callers must not
    change the result in place unless the parts are theirs to change."""
    first = parts[0]
    base = first._base
    if (base is not None and base.is_contiguous() and base.dtype == first.dtype
            and base.numel() == len(parts) * first.numel() and first.is_contiguous()):
        step = first.numel()
        start = base.storage_offset()
        last = parts[-1]
        if ([t.storage_offset() for t in parts if t._base is base] == list(range(start, start + len(parts) * step, step))
                and last.shape == first.shape and last.is_contiguous()):
            return base.view(len(parts), *first.shape)
    return torch.stack(parts)


class BatchedStat(StatBase):
    """A statistic whose update is one pure step over a leading site dimension: ``G`` sites'
    states are stacked, stepped together (eagerly or as one compiled graph) and handed back."""

    @staticmethod
    def _run(state: tuple[Tensor, ...], x: Tensor, parts: Finite, tokens: Tokens, compiled: bool) -> tuple:
        raise NotImplementedError

    def _chunk(self, x: Tensor, parts: Finite, tokens: Tokens) -> tuple[Tensor, ...]:
        """The state (``_fields`` order, leading site dim) of chunk ``x[G, n, D]`` alone."""
        raise NotImplementedError

    @staticmethod
    def _merge(state: tuple[Tensor, ...], chunk: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        """Two stacked states merged by the declared reductions (pure, batched over sites)."""
        raise NotImplementedError

    @classmethod
    def partial(cls, stat: Self, x: Tensor, tokens: Tokens) -> tuple[Tensor, ...] | None:
        """Phase one of a two-phase update: the state of ``stat``'s chunk ``x[1, n, D]`` alone,
        computed while the chunk is in cache; :meth:`fold` merges many sites' at once, so the
        small per-state operations run once per forward rather than once per site."""
        if stat.compiled(x):  # one compiled graph does the whole step
            cls.update_group([stat], x, tokens)
            return None
        if not cls._ready([stat], x):
            return None
        return stat._chunk(x, finite(x, tokens), tokens)

    @classmethod
    def fold(cls, stats: list, parts: list) -> None:
        """Phase two: merge each ``parts[i]`` (from :meth:`partial`, or ``None``) into ``stats[i]``
        in one batched step over the sites."""
        pairs = [(stat, part) for stat, part in zip(stats, parts) if part is not None]
        if not pairs:
            return
        if len(pairs) == 1:
            state = tuple(pairs[0][0].s[f].unsqueeze(0) for f in cls._fields)
            chunk = pairs[0][1]
        else:
            state = tuple(stacked([stat.s[f] for stat, _ in pairs]) for f in cls._fields)
            chunk = tuple(torch.cat(column) for column in zip(*(part for _, part in pairs)))
        per_site = [value.unbind(0) for value in cls._merge(state, chunk)]
        for g, (stat, _) in enumerate(pairs):
            stat._state = {f: views[g] for f, views in zip(cls._fields, per_site)}

    @classmethod
    def update_group(cls, stats: list, x: Tensor, tokens: Tokens) -> None:
        if not cls._ready(stats, x):
            return
        if len(stats) == 1:
            state = tuple(stats[0].s[f].unsqueeze(0) for f in cls._fields)
        else:
            state = tuple(stacked([stat.s[f] for stat in stats]) for f in cls._fields)
        new = cls._run(state, x, finite(x, tokens), tokens, stats[0].compiled(x))
        per_site = [value.unbind(0) for value in new]
        for g, stat in enumerate(stats):
            stat._state = {f: views[g] for f, views in zip(cls._fields, per_site)}


#: torch.compile backend of the compiled updates; ``None`` turns compiling off everywhere
COMPILE_BACKEND: str | None = "inductor"
_COMPILED: dict[Callable, Callable] = {}
_EAGER: set[Callable] = set()


def run_compiled(fn: Callable, *args: Any) -> Any:
    """``fn(*args)`` through ``torch.compile`` (dynamic shapes, one graph, compiled once per process
    and shape family). ``fn`` must be pure; if compiling it fails, one warning says so and it runs
    eagerly from then on (the result is the same, only slower)."""
    if fn not in _EAGER and COMPILE_BACKEND is not None:
        compiled = _COMPILED.get(fn)
        if compiled is None:
            compiled = _COMPILED[fn] = torch.compile(fn, dynamic=True, fullgraph=True, backend=COMPILE_BACKEND)
        try:
            return compiled(*args)
        except Exception as err:  # a compiler failure must not cost the run: eager gives the same result
            _EAGER.add(fn)
            root: BaseException = err  # dynamo wraps the compiler's own error (inner_exception)
            while (inner := getattr(root, "inner_exception", None) or root.__cause__) is not None:
                root = inner
            why = (str(root).strip().splitlines() or [""])[0][:200]
            warnings.warn(f"probe: torch.compile of {fn.__module__}.{fn.__qualname__} failed "
                          f"({type(root).__name__}: {why}); running it eagerly "
                          "(pass compile=False to skip compiling)", stacklevel=2)
    return fn(*args)


def central_sums(d: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Float64 per-column ``(sum d**2, sum d**3, sum d**4)`` of the float32 ``d[..., n, D]``.

    The powers are formed in float32 (one rounding each) and summed by torch's float32 reductions,
    which are blocked (cascade) sums on CPU and tree sums on CUDA: their error grows with the log
    of ``n``, not with ``n``, so it stays at the level of the powers' own rounding.
    """
    d2 = d * d
    s2 = d2.sum(-2)
    s3 = d2.mul_(d).sum(-2)  # d**3 in place of d**2
    s4 = d2.mul_(d).sum(-2)  # d**4
    return s2.double(), s3.double(), s4.double()


def scaled_central_sums(d: Tensor, dev: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`central_sums` of the float32 ``d[..., n, D]`` (overwritten) whose columns lie within
    the float64 ``dev[..., D]`` of 0: each column is first scaled by the power of two that brings
    ``dev`` near 1 (:func:`power_of_two`), and the float64 sums are scaled back, so that the float32
    powers neither overflow nor underflow. Exact scalings: for data in float32's normal range the
    sums equal :func:`central_sums`' bit for bit. One more elementwise pass over ``d``."""
    e = power_of_two(dev)
    s2, s3, s4 = central_sums(d.mul_(pow2(-e, d.dtype).unsqueeze(-2)))
    up = pow2(e, torch.float64)
    return s2 * up**2, s3 * up**3, s4 * up**4


def power_of_two(dev: Tensor) -> Tensor:
    """int32 exponents ``e`` with ``dev / 2**e`` in ``[0.5, 1)`` for the positive finite entries of
    the float64 ``dev`` (0 elsewhere), within ``[-126, 126]`` so that ``2**±e`` is a normal float32.

    Scaling by ``2**-e`` moves only the exponent: float32 deviations scaled so that the largest is
    near 1 keep every bit, and their powers can neither overflow (``|d|**4`` past ~1.8e9) nor
    leave the normal range below (``|d|**4`` under ``2**-126``, i.e. ``|d|`` under ~3e-10). Values
    far below the largest may still flush to zero, but they add less than ``2**-100`` of the sum.
    """
    ok = torch.isfinite(dev) & (dev > 0)
    e = torch.frexp(torch.where(ok, dev, 1.0)).exponent
    return torch.where(ok, e, 0).clamp_(-126, 126)


def pow2(e: Tensor, dtype: torch.dtype) -> Tensor:
    """``2.0**e`` in ``dtype`` (float32 or float64) from integer exponents, built from the bits:
    exact, with no ``pow`` rounding (``e`` within the dtype's normal exponents)."""
    if dtype == torch.float64:
        return ((e.long() + 1023) << 52).view(torch.float64)
    return ((e.int() + 127) << 23).view(torch.float32)


#: a channel whose kept values span less than this, but not zero, has float32 deviations so small
#: that their fourth powers near the bottom of float32's normal range (``|d|**4 < 2**-92``): the
#: CPU paths recompute such a chunk with float64 powers, as they do when the powers overflow
TINY_SPREAD = 2.0**-22


def tiny_spread(lo: Tensor, hi: Tensor) -> bool:
    """Whether any entry's range ``[lo, hi]`` (float32 extremes of a CPU chunk) is non-empty but
    narrower than :data:`TINY_SPREAD`. A host read, in numpy: on these few hundred values a numpy
    expression costs a third of the same torch ops (only where :func:`host_checks` allows)."""
    spread = np.subtract(hi.detach().numpy(), lo.detach().numpy(), dtype=np.float64)
    return bool(((spread > 0) & (spread < TINY_SPREAD)).any())


def finite_host(t: Tensor) -> bool:
    """Whether every value of the small CPU tensor ``t`` is finite (a host read, in numpy)."""
    return bool(np.isfinite(t.detach().numpy()).all())


def shift_moments(n: Tensor, delta: Tensor, s2: Tensor, s3: Tensor, s4: Tensor) -> tuple[Tensor, ...]:
    """Central sums ``(M2, M3, M4)`` about the mean from power sums about a point ``delta`` below it."""
    m2 = s2 - n * delta**2
    m3 = s3 - 3 * delta * s2 + 2 * n * delta**3
    m4 = s4 - 4 * delta * s3 + 6 * delta**2 * s2 - 3 * n * delta**4
    return m2, m3, m4


class Finite:
    """What every statistic needs from one chunk ``x[..., n, D]``, computed once per chunk.

    ``xs`` is ``x`` with non-finite values replaced by 0 and ``fm`` the float mask that is 1
    where ``x`` is finite; ``abs`` is ``|xs|`` and ``rowmax`` its per-token maximum. All are built
    from arithmetic rather than ``isfinite``/``where`` (``x - x`` is 0 for finite values and NaN
    otherwise): on CPU, bool-producing kernels cost several times a vectorised float op, and these
    tensors let every statistic mask by multiplication.
    """

    __slots__ = ("x", "key", "_xs", "_fm", "_abs", "_rowmax", "_colsum", "_clean", "_wide")
    x: Tensor
    key: tuple
    _xs: Tensor | None
    _fm: Tensor | None
    _abs: Tensor | None
    _rowmax: Tensor | None
    _colsum: Tensor | None
    _clean: bool | None
    _wide: Tensor | None

    def __init__(self, x: Tensor, key: tuple) -> None:
        self.x = x
        self.key = key
        self._xs = self._fm = self._abs = self._rowmax = self._colsum = self._clean = self._wide = None

    @property
    def wide(self) -> Tensor:
        """``x`` in float64: on CPU a reused buffer (copy and sum run about twice as fast as a
        reduction with ``dtype=``), from which the float64 row and column sums are taken. One
        buffer per thread: valid while this is the chunk being processed (the statistics of one
        site's chunk run one after another, see ``StatEngine._run_sites``)."""
        if self._wide is None:
            if self.x.device.type == "cpu":
                self._wide = scratch("wide", tuple(self.x.shape), torch.float64).copy_(self.x)
            else:
                self._wide = self.x.double()
        return self._wide

    @property
    def colsum(self) -> Tensor:
        """float64 per-column sums ``Σ_t x[..., t, d]`` of the raw ``x`` (non-finite where a column
        holds a non-finite value, and only there: float32 values cannot overflow a float64 sum)."""
        if self._colsum is None:
            if self.x.device.type == "cpu":
                self._colsum = self.wide.sum(-2)
            else:
                self._colsum = self.x.sum(-2, dtype=torch.float64)
        return self._colsum

    @property
    def clean(self) -> bool:
        """``True`` when ``x`` is a CPU tensor with every value finite. Read on the host, which
        costs nothing on CPU (no device to wait for); on accelerators it is always ``False``, so
        their path never syncs. The dense fast paths of the statistics key on it."""
        if self._clean is None:
            self._clean = self.x.device.type == "cpu" and bool(torch.isfinite(self.colsum).all())
            if self._clean:
                self._xs = self.x
        return self._clean

    def mark_clean(self) -> None:
        """Record that every value of ``x`` is finite (a caller checked it on the host)."""
        self._clean = True
        self._xs = self.x

    def rowmax_into(self, buffer: Tensor) -> Tensor:
        """:attr:`rowmax` of a clean ``x``, computing ``|x|`` in ``buffer`` (shaped like ``x``)
        instead of a fresh tensor when it is not known yet; ``buffer`` is overwritten."""
        if self._rowmax is None:
            self._rowmax = torch.abs(self.x, out=buffer).amax(-1)
        return self._rowmax

    @property
    def xs(self) -> Tensor:
        if self._xs is None:
            self._xs = torch.nan_to_num(self.x, nan=0.0, posinf=0.0, neginf=0.0)
        return self._xs

    @property
    def fm(self) -> Tensor:
        if self._fm is None:
            self._fm = torch.sub(self.x, self.x).add_(1.0).nan_to_num_(nan=0.0)
        return self._fm

    @property
    def abs(self) -> Tensor:
        if self._abs is None:
            self._abs = self.xs.abs()
        return self._abs

    @property
    def rowmax(self) -> Tensor:
        if self._rowmax is None:
            self._rowmax = self.abs.amax(-1)
        return self._rowmax


#: the CPU fast paths that read values on the host (:func:`dense`, :func:`host_reads`); the tests
#: that stand in for an accelerator's no-sync rule on CPU turn them off
DENSE_CPU = True
_SCRATCH = threading.local()


def host_reads(x: Tensor) -> bool:
    """Whether a statistic may read ``x``'s values on the host to pick a faster path: a CPU
    tensor (nothing to wait for) while :data:`DENSE_CPU` is on, and not one autograd is recording
    (the fast paths write into reused buffers). Never on an accelerator."""
    return DENSE_CPU and x.device.type == "cpu" and not (x.requires_grad and torch.is_grad_enabled())


#: per thread: whether the chunks being folded come from a float64 site (see :func:`wide_sums`)
_WIDE = threading.local()


@contextlib.contextmanager
def wide_sums(on: bool) -> Iterator[None]:
    """Within the block, the moment statistics (``moments``, ``position``) form their chunks'
    deviations and power sums in float64 rather than float32 when ``on``: the engine sets it for a
    site whose tensor is float64, whose chunks then agree with float64 arithmetic to ~1e-16 relative
    whatever their size or split (a shard of a layout is another chunk), not ~1e-7. The values
    themselves are the float32 copies every statistic reads; float32 and bfloat16 sites keep the
    float32 sums."""
    before = getattr(_WIDE, "on", False)
    _WIDE.on = bool(on)
    try:
        yield
    finally:
        _WIDE.on = before


def wide() -> bool:
    """Whether :func:`wide_sums` is on (on this thread)."""
    return getattr(_WIDE, "on", False)


def host_checks(x: Tensor) -> bool:
    """Whether a statistic may read a small reduction of ``x``'s chunk on the host to see that its
    float32 arithmetic overflowed or underflowed and redo the chunk in float64: a CPU tensor
    (nothing to wait for) while :data:`DENSE_CPU` is on, in any autograd mode (only reads, no
    reused buffers). Never on an accelerator, whose paths scale or widen instead."""
    return DENSE_CPU and x.device.type == "cpu"


def scratch(slot: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor:
    """A CPU buffer of ``shape`` and ``dtype`` reused across sites and forwards, valid until the
    next call with the same ``slot`` on this thread. The dense paths write their activation-sized
    temporaries here: a fresh buffer of a few MiB costs more in page faults (the allocator hands
    large blocks back to the OS) than the arithmetic done in it. Holds at most one buffer per slot
    (the largest chunk seen: ``CHUNK_ELEMENTS`` elements)."""
    pool = getattr(_SCRATCH, "pool", None)
    if pool is None:
        pool = _SCRATCH.pool = {}
    numel = math.prod(shape)
    buf = pool.get((slot, dtype))
    if buf is None or buf.numel() < numel:
        with torch.inference_mode(False):  # an ordinary tensor, whatever mode the caller runs in
            buf = pool[(slot, dtype)] = torch.empty(numel, dtype=dtype)
    return buf[:numel].view(shape)


def release_scratch() -> None:
    """Drop this thread's :func:`scratch` buffers (a capture does so when it exits)."""
    _SCRATCH.pool = {}


class Dense:
    """The kept tokens of a chunk, when the statistics may take their dense fast path: ``x[..., t,
    D]`` holds only kept tokens (``tokens.keep``; a copy of those rows unless every token is kept),
    every value finite, ``t > 0``; ``parts`` is its :class:`Finite`, and ``row``, ``position``,
    ``token`` ``[t]`` its tokens' metadata. With no mask to apply and no non-finite value to count,
    a statistic does the same arithmetic with fewer passes over the activations."""

    __slots__ = ("x", "parts", "row", "position", "token")

    def __init__(self, x: Tensor, parts: Finite, row: Tensor, position: Tensor, token: Tensor) -> None:
        self.x, self.parts, self.row, self.position, self.token = x, parts, row, position, token


def dense(x: Tensor, tokens: Tokens) -> Dense | None:
    """The :class:`Dense` view of chunk ``x[..., n, D]``, or ``None`` where the masked path must
    run: not a CPU tensor, no kept token, or a kept value that is not finite. Whether a value is
    finite and which tokens are kept are read on the host, which on CPU costs a small reduction and
    no wait; accelerators never take this path, so theirs never syncs. Shared through
    ``tokens.local`` by every statistic that reads the same chunk."""
    if not host_reads(x):
        return None
    key = (x.data_ptr(), tuple(x.shape), tuple(x.stride()), x.dtype, x._version)
    local = tokens.local
    view: Dense | None
    hit = local.get("dense")
    if hit is not None and hit[0] == key:
        return hit[1]
    if "keep_index" not in local:
        keep = tokens.keep
        local["keep_index"] = None if bool(keep.all()) else keep.nonzero().squeeze(1)
    index = local["keep_index"]
    if index is None:
        view = Dense(x, finite(x, tokens), tokens.row, tokens.position, tokens.token)
    else:
        # per site: index_select along the leading dim of a 2-D view is several times faster
        flat = x.reshape(-1, *x.shape[-2:])
        xk = scratch("kept", (flat.shape[0], index.numel(), x.shape[-1]), x.dtype)
        for xi, out in zip(flat, xk):
            torch.index_select(xi, 0, index, out=out)
        xk = xk.view(*x.shape[:-2], *xk.shape[-2:])
        view = Dense(xk, Finite(xk, ()), tokens.row[index], tokens.position[index], tokens.token[index])
        if "drop_index" not in local:
            local["drop_index"] = (~tokens.keep).nonzero().squeeze(1)
        # the kept columns' float64 sums from the whole chunk's (which the per-position statistic
        # shares) less the few dropped rows'
        wide = finite(x, tokens).wide
        colsum = wide.sum(-2) - wide.index_select(-2, local["drop_index"]).sum(-2)
        # a dropped row that is not finite spoils the difference: sum the kept rows themselves
        view.parts._colsum = colsum if bool(torch.isfinite(colsum).all()) else xk.sum(-2, dtype=torch.float64)
    if view.x.shape[-2] == 0 or not view.parts.clean:
        view = None
    local["dense"] = (key, view)
    return view


def finite(x: Tensor, tokens: Tokens) -> Finite:
    """The :class:`Finite` parts of chunk ``x``, shared through ``tokens.local`` by every statistic
    that reads the same chunk (the same memory, shape and version: views made per statistic match)."""
    key = (x.data_ptr(), tuple(x.shape), tuple(x.stride()), x.dtype, x.device, x._version)
    parts = tokens.local.get("finite")
    if parts is None or parts.key != key:
        parts = tokens.local["finite"] = Finite(x, key)
    return parts
