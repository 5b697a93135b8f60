"""The context manager that attaches probe to a model for the length of a ``with`` block.

Recipe::

    with probe.capture(model, out="run.h5", skip_first=1) as run:
        for batch in loader:
            model(**batch)
    run["hidden_states.5"].kurtosis

Everything is validated before any hook is registered; hooks are registered inside ``try`` and
removed in ``finally``, so the model is left exactly as it was on every exit path.

The units it puts together: which tensors (:mod:`probe.capture.sites`), which tokens each holds
(:mod:`probe.capture.tokens`), the hooks (:mod:`probe.capture.hooks`) and one forward's life (:mod:`probe.capture.forward`:
site tensors are staged as the forward runs and folded into the statistics, on the tensors' own
device, when it ends — all sites or, if it raised, none).
"""

from __future__ import annotations

import os
import secrets
import threading
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from . import kernels as _kernels
from .. import stats as _stats
from ..stats import _base as _stats_base
from ..stats._state import WindowState
from .schedule import as_schedule
from ..errors import ProbeError, SiteError
from .forward import Forwards, describe
from .hooks import Handle, HookSet
from .sites import Site, SiteSpec, resolve

__all__ = ["capture", "Capture", "Handle"]

#: elements per float32 chunk: bounds the temporaries a site's update allocates (16 MiB each on
#: CPU; 256 MiB on accelerators, where fewer, larger kernels matter more than memory)
CHUNK_ELEMENTS = 1 << 22
CHUNK_ELEMENTS_ACCELERATOR = 1 << 26
#: elements of activations that consecutive sites gather (as a float32 copy) before their
#: statistics run as one batch, on accelerators (see ``Capture._group_limit``)
GROUP_ELEMENTS_ACCELERATOR = 1 << 26


def capture(
    model: nn.Module,
    out: str | os.PathLike | None = None,
    *,
    sites: SiteSpec = "hidden_states",
    stats: Sequence[str] | None = None,
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
        skip_first: drop the first ``k`` real tokens of each sequence from every statistic except
            the per-position ones (which keep all real tokens so the first-token effect shows).
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
        overwrite: replace ``out`` if it exists.
        strict: re-raise errors inside statistics instead of disabling the site with a warning.
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
    return Capture(model, out, sites=sites, stats=stats, skip_first=skip_first,
                   max_positions=max_positions, histogram_bits=histogram_bits,
                   sample_size=sample_size, cross_budget=cross_budget, seed=seed, every=every,
                   phases=phases, distributed=distributed, overwrite=overwrite, strict=strict,
                   compile=compile, schedule=schedule)


def _eager(fn):
    """Keep torch.compile out of probe's hooks: they run eagerly at a graph break, so a model
    compiled inside the with-block is captured exactly and the hooks' Python is never traced."""
    return torch.compiler.disable(fn, recursive=True)


def _dist_info(distributed: bool | None) -> tuple[int, int]:
    import torch.distributed as dist

    ready = dist.is_available() and dist.is_initialized()
    if distributed and not ready:
        raise ProbeError("distributed=True but torch.distributed is not initialised; expected "
                         "init_process_group() first; call it before probe.capture, or pass distributed=None")
    if distributed is False or not ready:
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def _check_int(name: str, value: Any, low: int, fix: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ProbeError(f"{name} must be an int >= {low}; got {value!r}; {fix}")
    return value


class Capture:
    """A capture session; see :func:`capture`. Results are available after the block."""

    def __init__(self, model: nn.Module, out, *, sites, stats, skip_first, max_positions,
                 histogram_bits, sample_size, cross_budget, seed, every=None, phases=False,
                 distributed=None, overwrite=False, strict=False, compile=None, schedule=None) -> None:
        if not isinstance(model, nn.Module):
            raise ProbeError(f"model must be a torch.nn.Module; got {type(model).__name__}; "
                             "pass the model object itself (e.g. AutoModelForCausalLM.from_pretrained(...))")
        if hasattr(model, "_orig_mod") or getattr(model, "_compiled_call_impl", None) is not None:
            raise ProbeError("model is already compiled with torch.compile, and hooks added after compiling "
                             "never fire; expected an uncompiled model; enter probe.capture(model) on the "
                             "uncompiled model first, then call torch.compile(model) inside the block")
        self.schedule = as_schedule(schedule)
        self.every = None if every is None else _check_int("every", every, 1, "pass None to commit once at the end")
        self.phases = bool(phases)
        self.rank, self.world = _dist_info(distributed)
        self.skip_first = _check_int("skip_first", skip_first, 0, "pass 0 to keep every token")
        self.max_positions = _check_int("max_positions", max_positions, 1, "pass e.g. 4096")
        self.sample_size = _check_int("sample_size", sample_size, 1, "pass e.g. 20000")
        self.cross_budget = _check_int("cross_budget", cross_budget, 0, "pass a byte count such as 2 << 30")
        self.seed = (secrets.randbits(62) if seed is None
                     else _check_int("seed", seed, 0, "pass a non-negative int, or None to draw one"))
        self._steps: list[int] = []  # labels of the committed windows
        self.histogram_bits = _check_int("histogram_bits", histogram_bits, 0, "pass 7")
        _stats.Histogram(histogram_bits)  # validates the range
        names = _stats.DEFAULT if stats is None else (stats,) if isinstance(stats, str) else tuple(stats)
        unknown = [s for s in names if s not in _stats.NAMES]
        if unknown or not names:
            raise ProbeError(f"unknown stats {unknown or names!r}; expected a subset of {list(_stats.NAMES)}; "
                             "pass e.g. stats=('moments', 'histogram')")
        self.stats = tuple(s for s in _stats.NAMES if s in names)
        if "cos" in self.stats and "cross" not in self.stats:
            raise ProbeError("stats: 'cos' is computed by the cross-layer statistic; expected 'cross' with it; "
                             "pass stats=(..., 'cross', 'cos')")
        self.strict = bool(strict)
        if compile not in (None, True, False):
            raise ProbeError(f"compile must be None, True or False; got {compile!r}; "
                             "pass None to compile on accelerators only")
        self.compile = compile
        self.model = model
        self._defs: list[Site] = resolve(model, sites)
        if stats is None and all(s.read == "input" and s.source == "module" for s in self._defs):
            # calibration runs (module inputs only): per-channel moments and the histogram are what
            # quantizers read; the rest costs time and file size for no consumer
            self.stats = ("moments", "histogram")
        self._hooks = HookSet(model, self._defs)
        self._names = {"prefill": [s.name for s in self._defs],
                       "decode": [f"{s.name}@decode" for s in self._defs] if self.phases else []}
        self.out = None if out is None else os.fspath(out)
        if self.out is not None and self.rank == 0:
            from .. import store

            store.check_writable(self.out, overwrite)
        self.overwrite = overwrite
        self._writer = None
        self._rows: list = []
        self._committed = 0
        self._thread = threading.get_ident()
        self._warned_thread = False
        self._active = False
        self._forward = 0
        self._disabled: dict[str, str] = {}
        self._dtypes: dict[str, str] = {}
        self._group: dict[str, Any] | None = None
        self._deferred: list[tuple[str, Tensor, Any, Any]] = []  # CPU: a finished forward's sites, by reference
        self._group_elements: int | None = None  # None: by device (see _group_limit)
        self._window = self._new_window()
        self._result = None
        self._fw = Forwards(self, self._hooks, self._defs, self._names)

    # ----------------------------------------------------------------------------- set-up
    def _new_window(self) -> dict:
        window: dict[str, dict[str, Any]] = {}
        for name in self._names["prefill"] + self._names["decode"]:
            per = _stats.site_states(self.stats, histogram_bits=self.histogram_bits,
                                     max_positions=self.max_positions, sample_size=self.sample_size,
                                     compile=self.compile)
            window[name] = per
        old = getattr(self, "_cross", None)
        self._cross = None
        if "cross" in self.stats:
            self._cross = _stats.Cross([s.name for s in self._defs], budget=self.cross_budget,
                                       cosines="cos" in self.stats)
            self._cross.members = old.members if old is not None else None
        return window

    @property
    def meta(self) -> dict[str, Any]:
        """The run's description (a dict, like :attr:`probe.results.run.Run.meta`), stored as the file's
        root attribute ``meta``."""
        from .._version import __version__

        import transformers

        config = getattr(self.model, "config", None)
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
                 "hf_index": s.hf_index, "dtype": self._dtypes.get(s.name, ""), "phase": phase,
                 "call": s.call, "stack": s.stack, "source": s.source, "what": s.describe()}
                for phase in ("prefill", "decode") for name, s in zip(self._names[phase], self._defs)
            ],
            "phases": self.phases,
            "every": self.every,
            "world_size": self.world,
            "stats": list(self.stats),
            "mask_policy": "attention_mask zeros are padding and enter no statistic",
            "skip_first": self.skip_first,
            "max_positions": self.max_positions,
            "histogram": {"encoding": "float32-bits", "mantissa_bits": self.histogram_bits},
            "sample": {"size": self.sample_size, "seed": self.seed},
            "cross_sites": list(self._cross.sites) if self._cross is not None else [],
            "disabled": dict(self._disabled),
        }

    def __repr__(self) -> str:
        state = "attached" if self._active else "detached"
        lines = [f"Capture({type(self.model).__name__}, {len(self._defs)} sites, {state}, "
                 f"stats={list(self.stats)}, out={self.out!r})"]
        lines += [f"  {h.site:<24} {h.kind:<12} {h.module or '<root>'}" for h in self._hooks.handles]
        return "\n".join(lines)

    def __enter__(self) -> Capture:
        if self._active or self._result is not None:
            raise ProbeError("this capture was already entered; expected a fresh one per with-block; "
                             "call probe.capture(model, ...) again")
        if self.out is not None and self.rank == 0:
            from .. import store

            self._writer = store.Writer(self.out, self.overwrite)
        self._thread = threading.get_ident()
        try:
            self._register()
        except BaseException:
            self._remove()
            if self._writer is not None:
                self._writer.abort()
            raise
        self._active = True
        return self

    def _register(self) -> None:
        self._hooks.attach(self._begin, self._end, self._enter, self._leave, self._observe)

    def _remove(self) -> None:
        attached = bool(self._hooks.handles)
        self._hooks.remove()
        if attached:
            self._fw.report_silent()

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            self._remove()
        finally:
            self._active = False
            _stats_base.release_scratch()  # the CPU fast paths' reused buffers go with the capture
            self._fw.release()
            try:
                self._commit(final=True)
            except Exception as err:
                if exc is None:
                    raise
                warnings.warn(f"probe: could not save the last window while handling {exc_type.__name__}: {err}",
                              stacklevel=2)
            else:
                self._warn_all_skipped()
        return False

    def _warn_all_skipped(self) -> None:
        """One warning when ``skip_first`` removed every real token of a site that saw some."""
        if not self.skip_first or "moments" not in self.stats or self._result is None:
            return
        empty = [n for n in self._result.sites if n not in self._disabled and self._result[n].tokens == 0]
        if empty:
            warnings.warn(f"probe: skip_first={self.skip_first} left no token at {len(empty)} site(s) "
                          f"({', '.join(empty[:4])}{' …' if len(empty) > 4 else ''}): every real token sat at a "
                          f"position below {self.skip_first}, so their statistics are empty (NaN); pass a smaller "
                          "skip_first, or longer sequences", stacklevel=3)

    # ------------------------------------------------------------------------------ hooks
    def _finish_cross(self) -> None:
        if self._cross is None:
            return
        try:
            self._cross.finish()
        except Exception as err:
            if self.strict:
                raise ProbeError(f"cross-layer statistics failed: {err}") from err
            self._disabled["cross"] = str(err)
            self._cross = None
            warnings.warn(f"probe: cross-layer statistics failed ({err}); disabled for the rest of the run",
                          stacklevel=2)

    # the hooks' entry points: thin, so that each hook is one frame of Capture (kept eager)
    @_eager
    def _begin(self, module, args, kwargs) -> None:
        self._fw.begin(module, args, kwargs)

    @_eager
    def _end(self, module, args, output) -> None:
        self._fw.end(module, args, output)

    @_eager
    def _enter(self, name: str, module, args, kwargs) -> None:
        self._fw.enter(name, module, args, kwargs)

    @_eager
    def _leave(self, name: str, output: Any) -> None:
        self._fw.leave(name, output)

    @_eager
    def _observe(self, i: int, x: Any) -> None:
        self._fw.observe(i, x)

    @property
    def _call(self) -> dict[str, Any] | None:
        """The model's token inputs while one of its forwards runs, else ``None``."""
        return self._fw._call

    def _fold(self, i: int, name: str, x2: Tensor, tokens: Any, phase: str = "prefill", ended: Any = None) -> None:
        """Feed one site's ``[n, D]`` tensor to the cross-layer statistic and the per-site ones.
        Runs outside inference mode (``_fold_pending``), so that states stay ordinary tensors that
        later forwards may update; an inference tensor is copied once, as the statistics read
        version counters, which inference tensors lack. ``ended`` (the tensor the hook received): the
        forward has ended (no model code runs before :meth:`_flush_group`), so a CPU site is kept by
        reference and run with the rest of the forward's sites (:meth:`_run_sites`)."""
        if x2.is_inference():
            x2 = x2.clone()
        if self._cross is not None and phase == "prefill":
            self._cross.hold(i, x2, tokens)
        limit = self._group_limit(x2.device)
        if limit and 2 * x2.numel() <= limit:
            self._group_add(name, x2, tokens, limit)
        elif ended is not None and not limit and not _kernels.wanted(x2):
            self._deferred.append((name, x2, tokens, ended))
        else:
            self._run_stats([name], x2.unsqueeze(0), tokens)

    def _group_limit(self, device: torch.device) -> int:
        """Elements of float32 activations gathered from consecutive sites before their statistics
        run as one batch (0: each site on its own). Accelerators batch, since there kernel launches
        cost more than the arithmetic; on CPU the arithmetic dominates and batching buys nothing."""
        if self._group_elements is not None:
            return self._group_elements
        return 0 if device.type == "cpu" else GROUP_ELEMENTS_ACCELERATOR

    def _group_add(self, name: str, x2: Tensor, tokens: Any, limit: int) -> None:
        """Copy ``x2`` (upcast to float32) into the pending group; run the group when it is full.
        A copy, not a reference: the module may change its output in place after the hook."""
        key = (id(tokens), tuple(x2.shape), x2.device)
        if self._group is not None and self._group["key"] != key:
            self._flush_group()
        if self._group is None:
            capacity = max(1, min(len(self._defs), limit // max(1, x2.numel())))
            buffer = torch.empty((capacity, *x2.shape), dtype=torch.float32, device=x2.device)
            self._group = {"key": key, "tokens": tokens, "names": [], "buffer": buffer}
        group = self._group
        group["buffer"][len(group["names"])].copy_(x2)
        group["names"].append(name)
        if len(group["names"]) == group["buffer"].shape[0]:
            self._flush_group()

    def _flush_group(self) -> None:
        if self._deferred:
            deferred, self._deferred = self._deferred, []
            batches: dict[tuple, list] = {}
            for item in deferred:
                batches.setdefault((id(item[2]), tuple(item[1].shape), item[1].dtype), []).append(item)
            with torch.inference_mode(False), torch.no_grad():  # states stay ordinary tensors (see _fold)
                for batch in batches.values():
                    self._run_sites(batch)
        group, self._group = self._group, None
        if group is None:
            return
        names = group["names"]
        x = group["buffer"][: len(names)]
        try:
            self._run_stats(names, x, group["tokens"])
        except Exception as err:
            self._site_failed(names, f"shape {tuple(x.shape[1:])}, batched", err)

    def _run_stats(self, names: list[str], x: Tensor, tokens: Any) -> None:
        """Fold ``x[G, n, D]``, the activations of the ``G`` sites ``names`` over the same tokens,
        into their statistics: one batched update per statistic, in chunks of tokens."""
        pers = [self._window[name] for name in names]
        kinds = list(pers[0])
        if _kernels.wanted(x):  # CUDA + Triton: one fused kernel for moments, histogram, position
            kinds = _kernels.update(pers, x, tokens)
        g, n, d = x.shape
        chunked = [k for k in kinds if pers[0][k].chunked]
        if chunked:
            budget = CHUNK_ELEMENTS if x.device.type == "cpu" else CHUNK_ELEMENTS_ACCELERATOR
            step = max(1, budget // max(1, g * d))
            for a in range(0, n, step):
                xc = x[:, a:a + step]
                xc = xc.float() if xc.dtype != torch.float32 else xc
                tc = tokens.slice(a, a + step)
                for k in chunked:
                    type(pers[0][k]).update_group([per[k] for per in pers], xc, tc)
        for k in kinds:
            if not pers[0][k].chunked:
                type(pers[0][k]).update_group([per[k] for per in pers], x, tokens)

    def _run_sites(self, batch: list[tuple[str, Tensor, Any, Any]]) -> None:
        """Fold sites ``(name, x[n, D], tokens, hook's tensor)`` of one forward (same tokens, same shape) into
        their statistics in two phases per chunk of tokens: each site's chunk state, computed with
        every statistic while that site's chunk is in cache (:meth:`~probe.stats._base.StatBase.
        partial`), then one batched merge per statistic over all the sites (``fold``). An error
        disables the site it came from (a merge's error, the sites it merged), with one warning."""
        tokens = batch[0][2]
        n, d = batch[0][1].shape
        step = max(1, CHUNK_ELEMENTS // max(1, d))

        def whole(name: str, x2: Tensor, source: Any) -> None:  # the statistics that read the whole forward
            try:
                for stat in self._window[name].values():
                    if not stat.chunked:
                        type(stat).update_group([stat], x2.unsqueeze(0), tokens)
            except Exception as err:
                self._site_failed([name], describe(source), err)

        for a in range(0, n, step):
            tc = tokens.slice(a, a + step)
            parts: dict[str, tuple[list, list, list]] = {}
            for name, x2, _, source in batch:
                if name in self._disabled:
                    continue
                xc = x2[a:a + step]
                xc = (xc.float() if xc.dtype != torch.float32 else xc).unsqueeze(0)
                per = self._window[name]
                try:
                    for k, stat in per.items():
                        if stat.chunked:
                            part = type(stat).partial(stat, xc, tc)
                            names, stats, chunks = parts.setdefault(k, ([], [], []))
                            names.append(name), stats.append(stat), chunks.append(part)
                except Exception as err:
                    self._site_failed([name], describe(source), err)
                if step >= n and name not in self._disabled:  # one chunk: the site is still in cache
                    whole(name, x2, source)
            for k, (names, stats, chunks) in parts.items():
                live = [j for j, name in enumerate(names) if name not in self._disabled]
                try:
                    type(stats[0]).fold([stats[j] for j in live], [chunks[j] for j in live])
                except Exception as err:
                    self._site_failed([names[j] for j in live], f"shape {(n, d)}, batched", err)
        if step < n:
            for name, x2, _, source in batch:
                if name not in self._disabled:
                    whole(name, x2, source)

    def _site_failed(self, names: list[str], what: str, err: Exception) -> None:
        """Disable ``names`` after ``err`` with one warning (``strict``: raise :class:`SiteError`)."""
        message = f"site{'s' if len(names) > 1 else ''} {names if len(names) > 1 else repr(names[0])} ({what}): {err}"
        if self.strict:
            raise SiteError(message) from err
        for name in names:
            self._disabled[name] = str(err)
        warnings.warn(f"probe: {message}; {'these sites are' if len(names) > 1 else 'this site is'} disabled for "
                      "the rest of the run", stacklevel=3)

    # ------------------------------------------------------------------------- snapshots
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
        if step is not None and (isinstance(step, bool) or not hasattr(step, "__index__")):
            raise ProbeError(f"snapshot(step=...) must be an int; got {step!r}; pass e.g. the optimizer step")
        label = self._forward if step is None else int(step)
        if label in self._steps:
            self._flush_group()
            self._finish_cross()
            if step is None and self._window_empty():
                return
            raise ProbeError(f"snapshot(step={label}): a window with step {label} was committed already; expected "
                             f"a new label (committed: {self._steps[-5:]}); pass another step, or none to commit "
                             "under the number of forwards")
        self._commit(step=label)

    def _window_empty(self) -> bool:
        return all(st.empty for per in self._window.values() for st in per.values()) and (
            self._cross is None or self._cross.empty)

    def _commit(self, step: int | None = None, final: bool = False) -> None:
        self._flush_group()
        self._finish_cross()
        if final and self._window_empty() and (self._committed or self.world > 1):
            self._finish_result()  # nothing since the last window (a rank with no forward adds none)
            return
        label = self._forward if step is None else int(step)
        if final and label in self._steps:  # an explicit label took this number: never lose the window
            label = max(self._steps) + 1
        row = WindowState(
            label,
            {name: {k: {f: v.detach().cpu().numpy() for f, v in st.state_dict().items()}
                    for k, st in per.items()} for name, per in self._window.items()},
            {f: v.cpu().numpy() for f, v in self._cross.state_dict().items()} if self._cross is not None else {},
        )
        if self.world > 1 or self._writer is None:  # ranks merge their windows at exit
            self._rows.append(row)
        else:
            self._writer.append(self.meta, row)
        self._steps.append(label)
        self._window = self._new_window()
        self._committed += 1
        if final:
            self._finish_result()

    def _sync(self) -> list:
        """Merge every rank's windows (see :mod:`probe.capture.sync`): called at exit, which every rank
        reaches whatever its number of batches."""
        import torch.distributed as dist

        from . import sync

        device = torch.device("cpu")
        if dist.get_backend() == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        # one description on every rank: rank 0's seed, the cross-layer members any rank fixed
        seed = torch.tensor([self.seed if self.rank == 0 else 0], dtype=torch.int64, device=device)
        dist.all_reduce(seed)
        self.seed = int(seed)
        if self._cross is not None:
            members = torch.zeros(len(self._cross.candidates), dtype=torch.int64, device=device)
            members[list(self._cross.members or [])] = 1
            dist.all_reduce(members, op=dist.ReduceOp.MAX)
            self._cross.members = [i for i, m in enumerate(members.tolist()) if m]
        return sync.merge_windows(self._rows, self.sites, [k for k in self.stats if k not in ("cross", "cos")],
                                  "cross" in self.stats, device)

    def _finish_result(self) -> None:
        from .. import store

        if self.world > 1:
            self._rows = self._sync()
            if self._writer is not None:
                for row in self._rows:
                    self._writer.append(self.meta, row)
        if self._writer is not None:
            self._result = store.read(self.out)
        else:
            self._result = store.in_memory(self.meta, self._rows)

    # ---------------------------------------------------------------- results after exit
    @property
    def result(self):
        """The :class:`probe.results.run.Run` after the block (``None`` while capturing)."""
        return self._result

    def _need_result(self):
        if self._result is None:
            raise ProbeError("results are read after the with-block; expected an exited capture; "
                             "read run[...] after the block, or call run.snapshot() and probe.load(out)")
        return self._result

    @property
    def cross(self):
        return self._need_result().cross

    @property
    def steps(self):
        return self._need_result().steps

    def at(self, step: int):
        return self._need_result().at(step)

    def __getitem__(self, name: str):
        return self._need_result()[name]

    def __iter__(self):
        """The sites' views in capture order, after the block (like iterating a loaded run)."""
        return iter(self._need_result())

    def __len__(self) -> int:
        """The number of sites (like ``len(run)`` of a loaded run)."""
        return len(self.sites)

    @property
    def sites(self) -> list[str]:
        """Site names in capture order (available before, during and after the block)."""
        return self._names["prefill"] + self._names["decode"]

