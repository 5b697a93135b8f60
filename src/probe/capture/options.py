"""The options of one capture, validated once, in one place.

Recipe::

    options = CaptureOptions.create("run.h5", stats=("moments", "histogram"), every=100)
    sites = resolve(model, options.sites)
    options = options.for_sites(sites)   # the default statistics of a calibration run

:func:`probe.capture` and the Hugging Face callback (:mod:`probe.integrations.hf`) both validate
through :meth:`CaptureOptions.create`, so an argument is refused with the same message whichever
way it came in, before any hook is registered or any file is opened.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, cast

from .. import stats as _stats
from ..errors import ProbeError, closest
from .parallel import Layout, check_layout
from .schedule import as_schedule
from .sites import Site, SiteSpec

__all__ = ["CaptureOptions", "StatName", "Preset", "check_int", "rank_and_world"]

#: the statistics ``capture(stats=...)`` accepts (:data:`probe.stats.NAMES`, in that order)
StatName = Literal["moments", "position", "histogram", "sample", "cross", "topk", "norm", "cos"]
#: the names of :data:`probe.stats.PRESETS` (``stats="calibration"``)
Preset = Literal["calibration"]

#: what a calibration run (every site a module's input) records when ``stats`` is not given
CALIBRATION: tuple[StatName, ...] = ("moments", "histogram")


def check_int(name: str, value: Any, low: int, fix: str, unit: str = "") -> int:
    """``value`` if it is an int (not a bool) of at least ``low``.

    Raises:
        ProbeError: otherwise, naming ``name`` (with ``unit``, e.g. ``" (optimizer steps)"``) and ``fix``.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ProbeError(f"{name} must be an int >= {low}{unit}; got {value!r}; {fix}")
    return value


def rank_and_world(distributed: Any) -> tuple[int, int]:
    """This process's rank and the world size a capture merges over (``0, 1`` when not distributed).

    Raises:
        ProbeError: ``distributed`` is true but ``torch.distributed`` is not initialised.
    """
    import torch.distributed as dist

    ready = dist.is_available() and dist.is_initialized()
    if distributed and not ready:
        raise ProbeError("distributed=True but torch.distributed is not initialised; expected "
                         "init_process_group() first; call it before probe.capture, or pass distributed=None")
    if distributed is False or not ready:
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def _stat_names(stats: str | Sequence[str] | None) -> tuple[StatName, ...]:
    """``stats=`` as names in the order they run (:data:`probe.stats.NAMES`); a preset's name
    (:data:`probe.stats.PRESETS`, e.g. ``"calibration"``) stands for its statistics."""
    if isinstance(stats, str) and stats in _stats.PRESETS:
        stats = _stats.PRESETS[stats]
    if isinstance(stats, str) and "," in stats:  # the CLI's --stats form, given to the Python API
        parts = tuple(p.strip() for p in stats.split(",") if p.strip())
        raise ProbeError(f"stats: got one string {stats!r}; expected a tuple of statistic names; "
                         f"pass stats={parts!r}")
    names = _stats.DEFAULT if stats is None else (stats,) if isinstance(stats, str) else tuple(stats)
    unknown = [s for s in names if s not in _stats.NAMES]
    if unknown or not names:
        near = closest(str(unknown[0]), [*_stats.NAMES, *_stats.PRESETS]) if unknown else ""
        raise ProbeError(f"unknown stats {unknown or names!r}{near}; expected a subset of {list(_stats.NAMES)} "
                         f"or a preset name ({', '.join(repr(p) for p in _stats.PRESETS)}); "
                         "pass e.g. stats=('moments', 'histogram') or stats='calibration'")
    chosen = cast("tuple[StatName, ...]", tuple(s for s in _stats.NAMES if s in names))
    if "cos" in chosen and "cross" not in chosen:
        raise ProbeError("stats: 'cos' is computed by the cross-layer statistic; expected 'cross' with it; "
                         "pass stats=(..., 'cross', 'cos')")
    return chosen


@dataclass(frozen=True)
class CaptureOptions:
    """Every argument of :func:`probe.capture` but the model, checked (see :meth:`create`).

    ``stats`` holds the statistics in the order they run; ``default_stats`` says they were not
    given (then :meth:`for_sites` narrows them for a calibration run). ``seed`` is drawn when
    not given; ``rank`` and ``world`` come from ``torch.distributed`` (``0, 1`` when off).
    """

    out: str | None
    sites: SiteSpec
    stats: tuple[StatName, ...]
    default_stats: bool
    skip_first: int
    max_positions: int
    histogram_bits: int
    sample_size: int
    cross_budget: int
    seed: int
    every: int | None
    phases: bool
    rank: int
    world: int
    overwrite: bool
    strict: bool
    compile: bool | None
    schedule: Callable[[int], bool] | None
    #: ``capture(parallel=...)``: how plain site tensors are placed across ranks (:mod:`probe.capture.parallel`)
    parallel: Layout | None = None
    grads: bool = False

    @classmethod
    def create(
        cls,
        out: str | os.PathLike | None = None,
        *,
        sites: SiteSpec = "hidden_states",
        stats: StatName | Preset | Sequence[StatName] | None = None,
        skip_first: int = 0,
        max_positions: int = 4096,
        histogram_bits: int = 7,
        sample_size: int = 20_000,
        cross_budget: int = 2 << 30,
        seed: int | None = None,
        every: int | None = None,
        phases: bool = False,
        distributed: bool | None = None,
        overwrite: bool = False,
        strict: bool = False,
        compile: bool | None = None,
        schedule: Any = None,
        parallel: Any = None,
        grads: bool = False,
    ) -> CaptureOptions:
        """Validate the arguments of :func:`probe.capture` (documented there).

        Returns:
            The options, with ``stats`` in run order, ``seed`` drawn if ``None`` and the
            schedule as ``forward_index -> bool``.

        Raises:
            ProbeError: an argument out of range or of the wrong type, unknown statistics,
                ``'cos'`` without ``'cross'``, a schedule that does not answer ``schedule(0)``,
                ``distributed=True`` without an initialised process group, a ``parallel`` that is
                not a :class:`probe.capture.parallel.Layout` (or a dict glob -> placement).
        """
        checked_schedule = as_schedule(schedule)
        checked_every = None if every is None else check_int("every", every, 1, "pass None to commit once at the end")
        rank, world = rank_and_world(distributed)
        checked = {
            "skip_first": check_int("skip_first", skip_first, 0, "pass 0 to keep every token"),
            "max_positions": check_int("max_positions", max_positions, 1, "pass e.g. 4096"),
            "sample_size": check_int("sample_size", sample_size, 1, "pass e.g. 20000"),
            "cross_budget": check_int("cross_budget", cross_budget, 0, "pass a byte count such as 2 << 30"),
        }
        drawn = (secrets.randbits(62) if seed is None
                 else check_int("seed", seed, 0, "pass a non-negative int, or None to draw one"))
        bits = check_int("histogram_bits", histogram_bits, 0, "pass 7")
        _stats.Histogram(bits)  # validates the range
        names = _stat_names(stats)
        layout = check_layout(parallel)
        if compile not in (None, True, False):
            raise ProbeError(f"compile must be None, True or False; got {compile!r}; "
                             "pass None to compile on accelerators only")
        return cls(out=None if out is None else os.fspath(out), sites=sites, stats=names,
                   default_stats=stats is None, histogram_bits=bits, seed=drawn, every=checked_every,
                   phases=bool(phases), rank=rank, world=world, overwrite=overwrite, strict=bool(strict),
                   compile=compile, schedule=checked_schedule, parallel=layout, grads=bool(grads), **checked)

    def for_sites(self, sites: list[Site]) -> CaptureOptions:
        """The options for the resolved ``sites``: when ``stats`` was not given and every site is a
        module's input (a calibration run), only ``("moments", "histogram")``: per-channel moments
        and the histogram are what quantizers read; the rest costs time and file size for no
        consumer."""
        if self.default_stats and all(s.read == "input" and s.source == "module" for s in sites):
            return replace(self, stats=CALIBRATION)
        return self
