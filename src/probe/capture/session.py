"""The context manager that attaches probe to a model for the length of a ``with`` block.

Recipe::

    with probe.capture(model, out="run.h5", skip_first=1) as run:
        for batch in loader:
            model(**batch)
    run["hidden_states.5"].kurtosis

Everything is validated before any hook is registered; hooks are registered inside ``try`` and
removed in ``finally``, so the model is left exactly as it was on every exit path.

The units it puts together, in data-flow order: the options (:mod:`probe.capture.options`,
validated once), which tensors (:mod:`probe.capture.sites`), the hooks (:mod:`probe.capture.hooks`),
one forward's life (:mod:`probe.capture.forward`: site tensors are staged as the forward runs and
folded into the statistics, on the tensors' own device, when it ends — all sites or, if it raised,
none), which tokens each holds (:mod:`probe.capture.tokens`), the statistics
(:mod:`probe.capture.engine`) and the windows (:mod:`probe.capture.window`: ``every=``, commits,
the store, the rank merge). After the block a :class:`Capture` answers like a loaded run.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from types import TracebackType
from typing import Any, Literal

import torch
from torch import nn

from .. import stats as _stats
from .. import store
from ..errors import ProbeError
from ..stats import _base as _stats_base
from .engine import StatEngine
from .grads import SUFFIX, Grads
from .forward import Forwards, forward_signature
from .hooks import Handle, HookSet
from .options import CaptureOptions, Preset, StatName
from .parallel import Placements
from .sites import Site, SiteSpec, resolve
from .window import Recorder

__all__ = ["capture", "Capture", "Handle", "check_model"]


def capture(
    model: nn.Module,
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
) -> Capture:
    """Capture streaming statistics of ``model``'s activations inside a ``with`` block.

    Args:
        model: any ``torch.nn.Module``; Hugging Face models get exact ``hidden_states`` parity.
        out: HDF5 file to write (schema in ``docs/format.md``); ``None`` keeps results in memory.
        sites: ``"hidden_states"`` (default: exactly the tensors ``output_hidden_states=True``
            returns, found as described in :mod:`probe.capture.sites`; encoder-decoders give
            ``encoder_hidden_states.i`` and ``decoder_hidden_states.i``), module names, glob
            patterns (a ``:input`` suffix captures a module's input), ``"linear_inputs"`` (the
            input of every linear layer but the output head), or a callable
            ``(name, module) -> bool``.
        stats: names from ``("moments", "position", "histogram", "sample", "cross", "topk", "norm",
            "cos")``; all but ``"cos"`` (per-token cosines between sites, inside ``"cross"``) by default,
            and ``("moments", "histogram")`` when every site is a module's input (calibration).
            ``"calibration"`` (a preset, :data:`probe.stats.PRESETS`) is only what the exports of
            :mod:`probe.export` read: the per-channel moments (counts, sums of squares through
            ``M2`` and the mean, minima and maxima), at a fraction of the default's cost.
        skip_first: leave out the real tokens at positions ``0 .. k - 1`` (the first ``k`` of each
            sequence; positions are ``position_ids`` when given, else counted over the mask) from
            the per-site moments (with min, max, ``absmax`` and the non-finite counts), the
            histogram and its quantiles, the uniform sample, the norm distribution, its
            non-finite count and the anisotropy, and the cross-layer ``r2``, ``cos`` and cosine
            histogram. These keep every real token, so the first-token effect shows: the
            per-position statistics (``"position"`` and the norms per position), the top-``k``
            magnitudes (``"topk"``) and the cross-layer ``r2_all`` and ``cos_all``.
        max_positions: per-position statistics cover positions ``0 .. max_positions - 1``.
        histogram_bits: mantissa bits ``m`` of the histogram buckets; quantiles are within
            ``2**-m / (2 + 2**-m)`` relative error (0.39 % at 7), exact for bf16 data.
        sample_size: ``k`` of the uniform per-site sample for scatter plots.
        cross_budget: bytes of one forward's activations probe may hold until the forward ends:
            the cross-layer statistic leaves a forward past it out, with a warning; the per-site
            statistics then fold sites in as they come instead of all at the end of the forward
            (so a forward that raises half-way may leave its first sites counted). On CPU each
            site is held as a copy taken at its hook (16-bit sites in float32), in buffers reused
            across forwards and freed at exit: a later in-place change by the model does not reach
            the statistics. On accelerators sites are held by reference; a forward whose site
            the model changes in place afterwards is left out, with one warning.
        seed: seed of the sample's per-forward keys; ``None`` (default) draws a fresh one per
            capture (recorded in ``meta["sample"]["seed"]``), so independent runs merge into an
            unbiased sample. Under ``torch.distributed`` rank 0's seed is recorded (each rank
            keys its forwards by ``(seed, rank, forward)``).
        every: commit a window (:meth:`Capture.snapshot`) after every ``every`` forward passes
            of ``model``; ``None`` commits once, at the end. (The HF Trainer callback counts
            optimizer steps instead.)
        phases: record forwards that extend a KV cache (``generate()`` decode steps) under
            separate sites named ``"<site>@decode"``; prefill forwards keep the plain names.
        distributed: under ``torch.distributed``, each rank keeps its windows (labelled by step)
            and at the end of the block all ranks merge them with tensor collectives, window by
            window over the union of their steps (ranks may run different numbers of batches);
            rank 0 then writes ``out`` and every rank gets the same merged result. ``None``
            (default) does so whenever a process group with more than one rank is initialised.
        overwrite: replace ``out`` if it exists (never while another live process writes it).
        strict: re-raise errors inside statistics instead of disabling the site with a warning,
            and a failed write of ``out`` (:class:`probe.store.StoreError`) instead of keeping the
            window in memory with a warning and writing it later or to a recovery file.
        compile: run the per-chunk updates of the moments and per-position statistics as
            ``torch.compile`` graphs (a few fused kernels instead of ~100 small ones per site).
            ``None`` (default) compiles on accelerators, where kernel launches dominate, and not
            on CPU; the first forward then pays a one-off compile (seconds to a minute). A
            failed compile falls back to eager with one warning.
        schedule: which forwards to record: a callable ``forward_index -> bool`` (0-based count
            of the model's forwards; called once with 0 at entry to check it) or a
            ``torch.profiler.schedule(...)`` (``RECORD`` steps are recorded). The other forwards
            cost a flag check per hook: no tensor is read. They still count toward ``every``
            and the step labels, not toward ``absmax_at``'s rows. ``None`` records every forward.
        parallel: under tensor or sequence parallelism, which part of each plain site
            tensor this rank holds: a :class:`probe.capture.parallel.Layout` (the group, and globs
            over site names -> ``"replicate"``, ``"tokens"``, ``"features"`` or ``"data"``). DTensor
            sites carry their own placements. Every global element is counted once; see
            docs/distributed.md. ``None``: plain sites are each rank's own data (refused in a model
            with tensor-parallel modules).
        grads: also record the same statistics of each site's gradient ``∂loss/∂activation``
            from the backward of the recorded forwards, as sites ``"<site>@grad"`` (read as
            ``run[site].grad``); forwards without a backward record none. With ``every=``, a
            window is then committed when the next forward begins or at exit, after its
            forwards' backward (see :mod:`probe.capture.grads`).

    Returns:
        A :class:`Capture`; use it as a context manager. After the block it answers like
        :func:`probe.load`: ``run.sites``, ``run["hidden_states.3"]``, ``run.cross``.

    Raises:
        ProbeError: bad arguments, unknown sites, an unwritable or existing ``out``, hidden
            states that no module call produces; raised before any hook is registered or any file
            is written. During the block, a site whose tokens cannot be known (a mask that does
            not fit its tensor) is disabled with one warning (``strict=True``: raises).

    Warns:
        UserWarning: at exit, naming every site that never fired or saw no real token.

    Example:
        >>> import probe, torch, transformers
        >>> model = transformers.GPT2Model(transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2))
        >>> with probe.capture(model) as run:
        ...     _ = model(torch.tensor([[1, 2, 3]]))
        >>> run.sites
        ['hidden_states.0', 'hidden_states.1', 'hidden_states.2']
    """
    check_model(model)
    options = CaptureOptions.create(out, sites=sites, stats=stats, skip_first=skip_first,
                                    max_positions=max_positions, histogram_bits=histogram_bits,
                                    sample_size=sample_size, cross_budget=cross_budget, seed=seed, every=every,
                                    phases=phases, distributed=distributed, overwrite=overwrite, strict=strict,
                                    grads=grads,
                                    compile=compile, schedule=schedule, parallel=parallel)
    return Capture(model, options)


def check_model(model: Any) -> None:
    """Refuse what probe cannot hook.

    Raises:
        ProbeError: ``model`` is not a ``torch.nn.Module``, or is compiled already (hooks added
            after ``torch.compile`` never fire).
    """
    if not isinstance(model, nn.Module):
        raise ProbeError(f"model must be a torch.nn.Module; got {type(model).__name__}; "
                         "pass the model object itself (e.g. AutoModelForCausalLM.from_pretrained(...))")
    if hasattr(model, "_orig_mod") or getattr(model, "_compiled_call_impl", None) is not None:
        raise ProbeError("model is already compiled with torch.compile, and hooks added after compiling "
                         "never fire; expected an uncompiled model; enter probe.capture(model) on the "
                         "uncompiled model first, then call torch.compile(model) inside the block")


#: sites resolved per (spec, module graph), most recent last (see :func:`resolved`)
_RESOLVED: OrderedDict[tuple, list[Site]] = OrderedDict()
_RESOLVED_SIZE = 32


def _graph(model: nn.Module) -> tuple:
    """What the sites of ``model`` depend on, as a hashable key: every module's name, class and
    ``forward`` (the class's, or one set on the instance), the training flag and the config. Two
    models with the same key run the same calls, so they have the same sites (weights aside)."""
    config: Any = getattr(model, "config", None)
    try:
        described = config.to_json_string(use_diff=False) if hasattr(config, "to_json_string") else repr(config)
    except Exception:  # a config that does not serialise: no caching for this model
        return (id(model), object())
    return (model.training, described, tuple(
        (name, type(m), getattr(type(m), "forward", None), m.__dict__.get("forward"))
        for name, m in model.named_modules()))


def resolved(model: nn.Module, sites: SiteSpec) -> list[Site]:
    """:func:`probe.capture.sites.resolve`, remembered per site spec and module graph
    (:func:`_graph`): the discovery forward that finds ``hidden_states`` runs once per model
    structure in a process, not once per capture. A spec that is a callable is not remembered.

    Raises:
        SiteError: as :func:`~probe.capture.sites.resolve` (errors are not remembered).
    """
    if callable(sites) and not isinstance(sites, str):
        return resolve(model, sites)
    spec = sites if isinstance(sites, str) else tuple(sites)
    try:
        key = (spec, _graph(model))
        hash(key)
    except TypeError:  # an unhashable entry: resolve reports it
        return resolve(model, sites)
    hit = _RESOLVED.get(key)
    if hit is None:
        hit = _RESOLVED[key] = resolve(model, sites)
        while len(_RESOLVED) > _RESOLVED_SIZE:
            _RESOLVED.popitem(last=False)
    else:
        _RESOLVED.move_to_end(key)
    return list(hit)


class Capture:
    """A capture session; see :func:`capture`. Results are available after the block.

    Args:
        model: the model to hook (checked with :func:`check_model`).
        options: validated options (:meth:`CaptureOptions.create`).

    Raises:
        ProbeError: as :func:`capture` (the model, unknown sites, an unwritable ``out``).
    """

    def __init__(self, model: nn.Module, options: CaptureOptions) -> None:
        check_model(model)
        self.model = model
        self._defs: list[Site] = resolved(model, options.sites)
        self.options = options = options.for_sites(self._defs)
        self._hooks = HookSet(model, self._defs)
        #: the sites with a gradient site: not the mixture-of-experts ones (their own statistics
        #: read packed copies of the router's and experts' calls, which carry no gradient)
        self._grad_defs = [s for s in self._defs if s.stats is None]
        self._names = {"prefill": [s.name for s in self._defs],
                       "decode": [f"{s.name}@decode" for s in self._defs] if options.phases else [],
                       "grad": [f"{s.name}{SUFFIX}" for s in self._grad_defs] if options.grads else []}
        if options.out is not None and options.rank == 0:
            store.check_writable(options.out, options.overwrite)
        self._active = False
        #: restores transformers' attention interface (attention sites only; see probe.capture.attention)
        self._unwatch: Callable[[], None] | None = None
        self._engine = StatEngine(options, self._defs, self.sites)
        self._placements = Placements(model, options.parallel, [s.name for s in self._defs],
                                      [s.module for s in self._defs], options.stats, options.world > 1)
        self._recorder = Recorder(options, self._engine, self.sites, describe=lambda: self.meta,
                                  placements=self._placements)
        self._forwards = Forwards(self._hooks, self._names, self._engine, self._recorder, options,
                                  forward_signature(model),
                                  Grads(self._engine, [f"{s.name}{SUFFIX}" if s.stats is None else ""
                                                       for s in self._defs]) if options.grads else None)
        self._forwards.placements = self._placements if options.world > 1 else None
        if options.world > 1 and "cross" in options.stats:  # every rank: the relay's groups are collective
            self._engine.relay = self._placements.relay(_collective_device())
            if self._engine.cross is not None:
                self._engine.cross.relay = self._engine.relay
        forwards = self._forwards
        self._recorder.stage_inputs = lambda: (max((int(c) for c in forwards._real.values()), default=-1),
                                               forwards.without_ids)

    # ------------------------------------------------------------------------ description
    @property
    def out(self) -> str | None:
        """The HDF5 file written (``None``: results in memory)."""
        return self.options.out

    @property
    def stats(self) -> tuple[StatName, ...]:
        """The statistics recorded, in the order they run."""
        return self.options.stats

    @property
    def every(self) -> int | None:
        """Forwards per window (``None``: one window, at the end)."""
        return self.options.every

    @property
    def rank(self) -> int:
        """This process's rank (0 when not distributed)."""
        return self.options.rank

    @property
    def world(self) -> int:
        """The number of ranks whose windows merge at exit (1 when not distributed)."""
        return self.options.world

    @property
    def seed(self) -> int:
        """The sample's seed (under ``torch.distributed``, rank 0's once the block ended)."""
        return self._recorder.seed

    @property
    def meta(self) -> dict[str, Any]:
        """The run's description (a dict, like :attr:`probe.results.run.Run.meta`), stored as the file's
        root attribute ``meta``."""
        from .._version import __version__

        import transformers

        o = self.options
        config: Any = getattr(self.model, "config", None)
        cross = self._engine.cross
        dtypes = self._forwards.dtypes
        return {
            "probe_version": __version__,
            "torch_version": torch.__version__,
            "transformers_version": transformers.__version__,
            "model": {
                "class": type(self.model).__name__,
                "name_or_path": getattr(config, "_name_or_path", "") or getattr(self.model, "name_or_path", ""),
                "config": config.to_diff_dict() if hasattr(config, "to_diff_dict") else {},
            },
            "sites": [
                {"name": name, "module": s.module, "read": s.read, "index": s.index,
                 "hf_index": s.hf_index, "dtype": dtypes.get(s.name, ""), "phase": phase,
                 "call": s.call, "stack": s.stack, "source": s.source, "what": s.describe()}
                for phase in ("prefill", "decode", "grad")
                for name, s in zip(self._names[phase], self._grad_defs if phase == "grad" else self._defs)
            ],
            "phases": o.phases,
            "every": o.every,
            "world_size": o.world,
            "stats": list(o.stats) + [k for k in _stats.SITE_ONLY  # mixture-of-experts and attention sites run them
                                      if k not in o.stats and any(k in (s.stats or ()) for s in self._defs)],
            "mask_policy": "attention_mask zeros are padding and enter no statistic",
            "skip_first": o.skip_first,
            "max_positions": o.max_positions,
            "histogram": {"encoding": "float32-bits", "mantissa_bits": o.histogram_bits},
            "sample": {"size": o.sample_size, "seed": self._recorder.seed},
            "cross_sites": list(cross.sites) if cross is not None else [],
            "disabled": dict(self._engine.disabled),
        }

    def __repr__(self) -> str:
        state = "attached" if self._active else "detached"
        stats: list[str] = list(self.stats)  # and what sites run on their own (mixture-of-experts: router, experts)
        stats += [k for k in dict.fromkeys(k for s in self._defs for k in (s.stats or ())) if k not in stats]
        lines = [f"Capture({type(self.model).__name__}, {len(self._defs)} sites, {state}, "
                 f"stats={stats}, out={self.out!r})"]
        lines += [f"  {h.site:<24} {h.kind:<12} {h.module or '<root>'}" for h in self._hooks.handles]
        return "\n".join(lines)

    # ---------------------------------------------------------------------------- the block
    def __enter__(self) -> Capture:
        if self._active or self._recorder.result is not None:
            raise ProbeError("this capture was already entered; expected a fresh one per with-block; "
                             "call probe.capture(model, ...) again")
        self._recorder.open()
        forwards = self._forwards
        forwards.thread = threading.get_ident()
        try:
            self._hooks.attach(forwards.begin, forwards.end, forwards.enter, forwards.leave, forwards.observe,
                               forwards.open, forwards.close, forwards.arrive)
            if any(s.stats == ("attention",) for s in self._defs):  # probe.capture.attention: the calls noted
                from .attention import watch

                hooks = self._hooks
                self._unwatch = watch(self.model, self._defs, lambda: not hooks.off)
        except BaseException:
            self._remove()
            self._recorder.abort()
            raise
        self._active = True
        return self

    def _remove(self, warn: bool = True) -> None:
        unwatch, self._unwatch = self._unwatch, None
        if unwatch is not None:
            unwatch()
        attached = bool(self._hooks.handles)
        self._hooks.remove()
        if attached:
            self._forwards.report_silent(warn)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> Literal[False]:
        try:
            self._remove(warn=exc is None)  # after an exception (Ctrl-C) silent sites say nothing of the model
        finally:
            self._active = False
            _stats_base.release_scratch()  # the CPU fast paths' reused buffers go with the capture
            self._forwards.release()
            try:
                self._recorder.commit(final=True)
            except Exception as err:
                if exc is None:
                    raise
                name = exc_type.__name__ if exc_type is not None else "an exception"
                warnings.warn(f"probe: could not save the last window while handling {name}: {err}",
                              stacklevel=2)
            else:
                if exc is None:
                    self._recorder.warn_all_skipped()
        return False

    def snapshot(self, step: int | None = None) -> None:
        """Commit the current window as one row (flushed to ``out``) and start a new window.

        A step labels one window. Under ``torch.distributed`` each rank keeps its windows and all
        ranks merge them, window by window (matched by step), when the block ends.

        Args:
            step: the row's label (e.g. the optimizer step); defaults to the number of forwards.

        Raises:
            ProbeError: ``step`` labels a window committed already (the window stays open, so
                nothing is lost). ``snapshot()`` with no new forward since the last window with
                the same default label does nothing.
        """
        self._forwards.settle()  # a forward of the model's forward called directly, ended since
        self._recorder.snapshot(step)

    # ---------------------------------------------------------------- results after exit
    @property
    def result(self) -> Any:
        """The :class:`probe.results.run.Run` after the block (``None`` while capturing)."""
        return self._recorder.result

    def _need_result(self) -> Any:
        result = self._recorder.result
        if result is None:
            raise ProbeError("results are read after the with-block; expected an exited capture; "
                             "read run[...] after the block, or call run.snapshot() and probe.load(out)")
        return result

    @property
    def cross(self) -> Any:
        """The cross-layer view (:class:`probe.results.run.CrossView`), after the block."""
        return self._need_result().cross

    @property
    def steps(self) -> list[int]:
        """The committed windows' labels, after the block."""
        return self._need_result().steps

    def at(self, step: int) -> Any:
        """The run of one window (like :meth:`probe.results.run.Run.at`), after the block."""
        return self._need_result().at(step)

    @property
    def rows(self) -> Any:
        """The committed windows (like :attr:`probe.results.run.Run.rows`), after the block."""
        return self._need_result().rows

    @property
    def total(self) -> Any:
        """All windows merged (like :attr:`probe.results.run.Run.total`), after the block."""
        return self._need_result().total

    @property
    def path(self) -> str | None:
        """The file written (``out``), or ``None`` for an in-memory capture."""
        return self.out

    def __getitem__(self, name: str) -> Any:
        """One site's view (like ``run[name]`` of a loaded run), after the block."""
        return self._need_result()[name]

    def __iter__(self) -> Iterator[Any]:
        """The sites' views in capture order, after the block (like iterating a loaded run)."""
        return iter(self._need_result())

    def __len__(self) -> int:
        """The number of sites (like ``len(run)`` of a loaded run)."""
        return len(self.sites)

    @property
    def sites(self) -> list[str]:
        """Site names in capture order (available before, during and after the block)."""
        return self._names["prefill"] + self._names["decode"] + self._names["grad"]


def _collective_device() -> torch.device:
    """Where this process's collectives run: its CUDA device under NCCL, else the CPU."""
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
