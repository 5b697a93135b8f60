"""The protocol every statistic follows, the token metadata they share, and the moment algebra.

A statistic is its sufficient statistics: ``update`` folds in a chunk of activations, ``merge``
folds in another instance of the same statistic (another window, rank or file), and the state
round-trips through ``state_dict`` / ``load_state_dict`` as plain tensors. State lives on the
device of the activations it saw; nothing in ``update`` synchronises with the host.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor

__all__ = ["Tokens", "Stat", "StatBase", "merge_moments", "chunk_moments", "finite_parts"]


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
    _fields: ClassVar[tuple[str, ...]] = ()

    def __init__(self) -> None:
        self._state: dict[str, Tensor] | None = None

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
        if other._state is None:
            return
        if self._state is None:
            self._state = {k: v.clone() for k, v in other._state.items()}
            return
        theirs = {k: v.to(self._state[k].device) for k, v in other._state.items()}
        self._merge(theirs)

    def _merge(self, other: dict[str, Tensor]) -> None:
        raise NotImplementedError

    @property
    def s(self) -> dict[str, Tensor]:
        assert self._state is not None
        return self._state


def merge_moments(a: tuple, b: tuple) -> tuple:
    """Combine central moment sums ``(n, mean, M2, M3, M4)`` of two disjoint sets.

    Pébay (2008), eqs. 3.1 and 3.2: exact algebra, written for tensors or numpy arrays alike.
    An empty side (``n == 0``) leaves the other untouched.
    """
    na, ma, m2a, m3a, m4a = a
    nb, mb, m2b, m3b, m4b = b
    n = na + nb
    safe = _clamp_one(n)
    delta = mb - ma
    dn = delta / safe
    dn2 = dn * dn
    nab = na * nb
    mean = ma + nb * dn
    m2 = m2a + m2b + delta * dn * nab
    m3 = m3a + m3b + dn2 * delta * nab * (na - nb) + 3 * dn * (na * m2b - nb * m2a)
    m4 = (
        m4a
        + m4b
        + dn2 * dn2 * nab * (na * na - nab + nb * nb) * safe
        + 6 * dn2 * (na * na * m2b + nb * nb * m2a)
        + 4 * dn * (na * m3b - nb * m3a)
    )
    return n, mean, m2, m3, m4


def _clamp_one(n):
    return n.clamp(min=1) if isinstance(n, Tensor) else n.clip(min=1)


def chunk_moments(xs: Tensor, w: Tensor) -> tuple[Tensor, ...]:
    """Float64 per-column ``(n, mean, M2, M3, M4)`` of ``xs[n, D]`` weighted by the 0/1 float ``w``.

    ``xs`` must be finite (see :func:`finite_parts`). Two passes: the mean (accumulated in
    float64), then the powers of ``d = (xs - mean) * w`` in ``xs``'s dtype, accumulated in
    float64. Centering first keeps the cancellation that ruins one-pass power sums out of the
    picture; the few ulps by which the float32 center misses the float64 mean are shifted out
    exactly (``delta = sum(d) / n``). The mean itself is the float64 sum over ``n``.
    """
    f64 = torch.float64
    n = w.sum(0, dtype=f64)
    safe = n.clamp(min=1)
    mean = (xs * w).double().sum(0) / safe
    center = mean.to(xs.dtype)
    d = (xs - center) * w
    d2 = d * d
    s1 = d.double().sum(0)
    s2 = d2.double().sum(0)
    s3 = (d2 * d).double().sum(0)
    s4 = (d2 * d2).double().sum(0)
    delta = s1 / safe
    m2 = s2 - n * delta**2
    m3 = s3 - 3 * delta * s2 + 2 * n * delta**3
    m4 = s4 - 4 * delta * s3 + 6 * delta**2 * s2 - 3 * n * delta**4
    return n, mean, m2, m3, m4


def finite_parts(x: Tensor) -> tuple[Tensor, Tensor]:
    """``(xs, fm)``: ``x`` with non-finite values replaced by 0, and a float mask that is 1 where
    ``x`` is finite and 0 elsewhere.

    Built from arithmetic (``x - x`` is 0 for finite values and NaN otherwise) rather than
    ``isfinite``: on CPU, bool-producing kernels cost ~10x a vectorised float op, and these two
    tensors let every statistic mask by multiplication and reduce by matrix-vector products.
    """
    fm = torch.nan_to_num((x - x) + 1.0, nan=0.0)
    return torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0), fm
