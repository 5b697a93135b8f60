"""The protocol every statistic follows, the token metadata they share, and the moment algebra.

A statistic is its sufficient statistics: ``update`` folds in a chunk of activations, ``merge``
folds in another instance of the same statistic (another window, rank or file), and the state
round-trips through ``state_dict`` / ``load_state_dict`` as plain tensors. State lives on the
device of the activations it saw; nothing in ``update`` synchronises with the host.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Protocol

import torch
from torch import Tensor

from ._state import SPECS, State, merge_moments, merge_states

__all__ = ["Tokens", "Stat", "StatBase", "BatchedStat", "Finite", "merge_moments", "SPECS", "central_sums", "finite",
           "run_compiled"]


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


class Stat(Protocol):
    """What :func:`probe.capture` needs from a statistic."""

    name: ClassVar[str]
    #: ``True`` when ``update`` takes token chunks; ``False`` when it wants the whole forward.
    chunked: ClassVar[bool]

    def update(self, x: Tensor, tokens: Tokens) -> None: ...

    def merge(self, other: Any) -> None: ...

    def state_dict(self) -> dict[str, Tensor]: ...

    def load_state_dict(self, state: dict[str, Tensor]) -> None: ...

    def to(self, device: torch.device | str) -> Any: ...


class StatBase:
    """Shared plumbing: lazily allocated state tensors named in ``_fields``."""

    name: ClassVar[str] = ""
    chunked: ClassVar[bool] = True
    #: the declared state (fields, dtypes, shapes, reductions); ``_fields`` is its field order
    spec: ClassVar[State]
    _fields: ClassVar[tuple[str, ...]] = ()

    def __init__(self) -> None:
        self._state: dict[str, Tensor] | None = None
        #: run the update as one torch.compile graph: ``None`` = on accelerators only
        self.compile: bool | None = None

    def compiled(self, x: Tensor) -> bool:
        """Whether this update of ``x`` runs compiled (see :func:`run_compiled`)."""
        wanted = x.device.type != "cpu" if self.compile is None else self.compile
        return wanted and COMPILE_BACKEND is not None

    @property
    def empty(self) -> bool:
        """``True`` until the first update (or load) allocates the state."""
        return self._state is None

    def state_dict(self) -> dict[str, Tensor]:
        return {} if self._state is None else dict(self._state)

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
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
        self._state = {f: torch.as_tensor(state[f]) for f in self._fields}

    def to(self, device: torch.device | str):
        if self._state is not None:
            self._state = {k: v.to(device) for k, v in self._state.items()}
        return self

    def merge(self, other) -> None:
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

    @classmethod
    def update_group(cls, stats: list, x: Tensor, tokens: Tokens) -> None:
        """Fold ``x[G, n, D]`` into ``stats`` (``G`` statistics of this class, one per site, all
        over the same tokens). Batched statistics do it in one step; others one site at a time."""
        for g, stat in enumerate(stats):
            stat.update(x[g], tokens)

    def _init_like(self, x: Tensor) -> None:
        """Allocate the state for activations like ``x[..., n, D]``."""
        raise NotImplementedError

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


class BatchedStat(StatBase):
    """A statistic whose update is one pure step over a leading site dimension: ``G`` sites'
    states are stacked, stepped together (eagerly or as one compiled graph) and handed back."""

    @staticmethod
    def _run(state: tuple[Tensor, ...], x: Tensor, parts: Finite, tokens: Tokens, compiled: bool) -> tuple:
        raise NotImplementedError

    def update(self, x: Tensor, tokens: Tokens) -> None:
        type(self).update_group([self], x.unsqueeze(0), tokens)

    @classmethod
    def update_group(cls, stats: list, x: Tensor, tokens: Tokens) -> None:
        if not cls._ready(stats, x):
            return
        if len(stats) == 1:
            state = tuple(stats[0].s[f].unsqueeze(0) for f in cls._fields)
        else:
            state = tuple(torch.stack([stat.s[f] for stat in stats]) for f in cls._fields)
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
    if fn not in _EAGER:
        compiled = _COMPILED.get(fn)
        if compiled is None:
            compiled = _COMPILED[fn] = torch.compile(fn, dynamic=True, fullgraph=True, backend=COMPILE_BACKEND)
        try:
            return compiled(*args)
        except Exception as err:  # a compiler failure must not cost the run: eager gives the same result
            _EAGER.add(fn)
            root = err  # dynamo wraps the compiler's own error (inner_exception)
            while getattr(root, "inner_exception", None) is not None or root.__cause__ is not None:
                root = getattr(root, "inner_exception", None) or root.__cause__
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

    __slots__ = ("x", "key", "_xs", "_fm", "_abs", "_rowmax")

    def __init__(self, x: Tensor, key: tuple) -> None:
        self.x = x
        self.key = key
        self._xs = self._fm = self._abs = self._rowmax = None

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


def finite(x: Tensor, tokens: Tokens) -> Finite:
    """The :class:`Finite` parts of chunk ``x``, shared through ``tokens.local`` by every statistic
    that reads the same chunk (the same memory, shape and version: views made per statistic match)."""
    key = (x.data_ptr(), tuple(x.shape), tuple(x.stride()), x.dtype, x.device, x._version)
    parts = tokens.local.get("finite")
    if parts is None or parts.key != key:
        parts = tokens.local["finite"] = Finite(x, key)
    return parts
