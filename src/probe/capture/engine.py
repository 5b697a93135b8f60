"""The statistics of one window, and how a site's tensor gets into them.

Recipe (what :class:`probe.capture.forward.Forwards` does with a site's ``[n, D]`` tensor)::

    engine = StatEngine(options, sites, names)
    engine.guarded(name, x, lambda: engine.fold(i, name, x2, tokens, phase))
    engine.flush()            # the forward ended: run what is gathered
    engine.finish_cross()     # ... and the cross-layer statistic over all its sites
    row = engine.window_state(step); engine.new_window()

A site's tensor reaches its statistics one of three ways: on accelerators consecutive sites over
the same tokens are gathered into one float32 batch and every statistic runs once per batch (the
fused Triton kernel for moments, histogram and position where it applies); on CPU, when the
forward has ended, its sites run in two phases per chunk of tokens (each site's chunk state while
it is in cache, then one batched merge per statistic); otherwise each site runs alone. Every path
cuts the tokens into chunks so the temporaries stay bounded.

An error inside a statistic disables the site it came from for the rest of the run, with one
warning (``strict``: raises :class:`~probe.errors.SiteError`); the host's forward goes on.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from . import kernels as _kernels
from .. import stats as _stats
from ..errors import ProbeError, SiteError
from ..stats._base import StatBase, Tokens, wide_sums
from ..stats._state import WindowState
from ..stats.cross import Cross
from .options import CaptureOptions
from .sites import Site

__all__ = ["StatEngine", "describe", "CHUNK_ELEMENTS", "CHUNK_ELEMENTS_ACCELERATOR", "GROUP_ELEMENTS_ACCELERATOR"]

#: elements per float32 chunk: bounds the temporaries a site's update allocates (16 MiB each on
#: CPU; 256 MiB on accelerators, where fewer, larger kernels matter more than memory)
CHUNK_ELEMENTS = 1 << 22
CHUNK_ELEMENTS_ACCELERATOR = 1 << 26
#: elements of activations that consecutive sites gather (as a float32 copy) before their
#: statistics run as one batch, on accelerators (see ``StatEngine._group_limit``)
GROUP_ELEMENTS_ACCELERATOR = 1 << 26
#: CPU sites of at most this many elements (a decode step's, a short prompt's) are stacked with the
#: forward's other sites of the same shape and reduced together (``StatEngine._run_stack``); larger
#: ones run site by site, each while it is in cache (``StatEngine._run_sites``)
STACK_ELEMENTS = 1 << 16


def describe(x: Any) -> str:
    """``shape (..), dtype ..`` of whatever a hook received, without failing on odd tensors."""
    if isinstance(x, Tensor):
        shape: tuple[int, ...] | str
        try:
            shape = tuple(x.shape)
        except RuntimeError:
            shape = "nested"
        return f"shape {shape}, dtype {str(x.dtype).replace('torch.', '')}"
    return f"shape {type(x).__name__}, dtype -"


@dataclass
class _Group:
    """Consecutive sites over the same tokens, copied into one float32 batch (accelerators)."""

    key: tuple
    tokens: Tokens
    buffer: Tensor  # [capacity, n, D]
    names: list[str] = field(default_factory=list)


_PLAIN = contextlib.nullcontext()


def _wide(x: Tensor) -> Any:
    """Float64 moment sums for a float64 site (:func:`probe.stats._base.wide_sums`); nothing (a
    reused null context, no cost to speak of) for the float32 and bfloat16 ones."""
    return wide_sums(True) if x.dtype == torch.float64 else _PLAIN


#: a CPU site of an ended forward, held by reference: name, ``x[n, D]``, its tokens, the hook's tensor
_Deferred = tuple[str, Tensor, Tokens, Any]


class StatEngine:
    """A window's per-site statistics and the cross-layer one, and the sites disabled so far.

    Args:
        options: the capture's options (statistics, their sizes, ``cross_budget``, ``strict``).
        sites: the capture's sites (the cross-layer statistic spans their prefill names).
        names: every per-site window key, in capture order (prefill names, then ``@decode`` ones).
    """

    def __init__(self, options: CaptureOptions, sites: list[Site], names: list[str]) -> None:
        self.options = options
        self.sites = sites
        self.names = names
        #: disabled site (or ``"cross"``) -> why; recorded in the run's description
        self.disabled: dict[str, str] = {}
        #: elements gathered per batch; ``None``: by device (see :meth:`_group_limit`)
        self.group_elements: int | None = None
        self.window: dict[str, dict[str, StatBase]] = {}
        self.cross: Cross | None = None
        #: a pipeline stage's relay of the cross-layer statistic (set by the capture; see Relay)
        self.relay: Any = None
        self._group: _Group | None = None
        self._deferred: list[_Deferred] = []  # CPU: a finished forward's sites, by reference
        #: window key -> its site, for the sites that run their own statistics (probe.capture.moe)
        self._own = {n: s for s in sites if s.stats is not None for n in names if n.split("@")[0] == s.name}
        self._stack_buffer: Tensor | None = None  # CPU: the small sites of a forward, stacked (_run_stack)
        self.new_window()

    # ----------------------------------------------------------------------------- windows
    def new_window(self) -> None:
        """Start a window: fresh statistics (the cross-layer members fixed so far carry over)."""
        o = self.options
        shared = tuple(k for k in o.stats if k not in _stats.SITE_ONLY)
        self.window = {}
        for name in self.names:
            own = self._own.get(name)
            self.window[name] = per = _stats.site_states(
                shared if own is None else own.stats, histogram_bits=o.histogram_bits,
                max_positions=o.max_positions, sample_size=o.sample_size, compile=o.compile)
            if own is not None and own.moe is not None:
                for stat in per.values():
                    getattr(stat, "configure", lambda *a: None)(*own.moe)
        old, self.cross = self.cross, None
        if "cross" in o.stats:
            self.cross = Cross([s.name for s in self.sites], budget=o.cross_budget, cosines="cos" in o.stats)
            self.cross.members = old.members if old is not None else None
            self.cross.relay = self.relay

    @property
    def empty(self) -> bool:
        """Whether nothing entered this window yet."""
        return all(st.empty for per in self.window.values() for st in per.values()) and (
            self.cross is None or self.cross.empty)

    def window_state(self, step: int) -> WindowState:
        """This window's states, read to the host as the typed value of a committed window."""
        return WindowState(
            step,
            {name: {k: {f: v.detach().cpu().numpy() for f, v in st.state_dict().items()}
                    for k, st in per.items()} for name, per in self.window.items()},
            {f: v.cpu().numpy() for f, v in self.cross.state_dict().items()} if self.cross is not None else {},
        )

    # ---------------------------------------------------------------------- disabling sites
    def guarded(self, name: str, x: Any, fn: Callable[[], None]) -> None:
        """Run ``fn`` for site ``name`` (``x``: what its hook received); an error disables the site
        with one warning (``strict``: raises). A disabled site runs nothing."""
        if name in self.disabled:
            return
        try:
            fn()
        except Exception as err:
            self.site_failed([name], describe(x), err)

    def site_failed(self, names: list[str], what: str, err: Exception) -> None:
        """Disable ``names`` after ``err`` with one warning (``strict``: raise :class:`SiteError`)."""
        message = f"site{'s' if len(names) > 1 else ''} {names if len(names) > 1 else repr(names[0])} ({what}): {err}"
        if self.options.strict:
            raise SiteError(message) from err
        for name in names:
            self.disabled[name] = str(err)
        warnings.warn(f"probe: {message}; {'these sites are' if len(names) > 1 else 'this site is'} disabled for "
                      "the rest of the run", stacklevel=3)

    def finish_cross(self) -> None:
        """Fold the held sites of the forward into the cross-layer statistic; an error disables it
        with one warning (``strict``: raises)."""
        if self.cross is None:
            return
        try:
            self.cross.finish()
        except Exception as err:
            if self.options.strict:
                raise ProbeError(f"cross-layer statistics failed: {err}") from err
            self.disabled["cross"] = str(err)
            self.cross = None
            warnings.warn(f"probe: cross-layer statistics failed ({err}); disabled for the rest of the run",
                          stacklevel=2)

    # ------------------------------------------------------------------------------ folding
    def fold(self, i: int, name: str, x2: Tensor, tokens: Tokens, phase: str = "prefill", ended: Any = None) -> None:
        """Feed site ``i``'s ``[n, D]`` tensor to the cross-layer statistic and the per-site ones.
        Runs outside inference mode (see :mod:`probe.capture.forward`), so that states stay
        ordinary tensors that later forwards may update; an inference tensor is copied once, as the
        statistics read version counters, which inference tensors lack. ``ended`` (the tensor the
        hook received): the forward has ended (no model code runs before :meth:`flush`), so a CPU
        site is kept by reference and run with the rest of the forward's sites (:meth:`_run_sites`)."""
        if x2.is_inference():
            x2 = x2.clone()
        if self.cross is not None and phase == "prefill" and name not in self._own:
            self.cross.hold(i, x2, tokens)
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
        if self.group_elements is not None:
            return self.group_elements
        return 0 if device.type == "cpu" else GROUP_ELEMENTS_ACCELERATOR

    def _group_add(self, name: str, x2: Tensor, tokens: Tokens, limit: int) -> None:
        """Copy ``x2`` (upcast to float32) into the pending group; run the group when it is full.
        A copy, not a reference: the module may change its output in place after the hook."""
        key = (id(tokens), tuple(x2.shape), x2.device, x2.dtype == torch.float64)
        if self._group is not None and self._group.key != key:
            self.flush()
        if self._group is None:
            capacity = max(1, min(len(self.sites), limit // max(1, x2.numel())))
            # float64 sites keep float64 (their moment sums are float64, see wide_sums)
            dtype = torch.float64 if x2.dtype == torch.float64 else torch.float32
            buffer = torch.empty((capacity, *x2.shape), dtype=dtype, device=x2.device)
            self._group = _Group(key, tokens, buffer)
        group = self._group
        group.buffer[len(group.names)].copy_(x2)
        group.names.append(name)
        if len(group.names) == group.buffer.shape[0]:
            self.flush()

    def flush(self) -> None:
        """Run what is gathered: the ended forward's CPU sites, then the pending group."""
        if self._deferred:
            deferred, self._deferred = self._deferred, []
            batches: dict[tuple, list[_Deferred]] = {}
            for item in deferred:
                # a site with its own statistics (probe.capture.moe) is never stacked with the others
                own = item[0] in self._own
                batches.setdefault((id(item[2]), tuple(item[1].shape), item[1].dtype, own), []).append(item)
            with torch.inference_mode(False), torch.no_grad():  # states stay ordinary tensors (see fold)
                for (*_, own), batch in batches.items():
                    n, d = batch[0][1].shape
                    if (not own and len(batch) > 1 and n * d <= STACK_ELEMENTS
                            and len(batch) * n * d <= CHUNK_ELEMENTS):
                        self._run_stack(batch)
                    else:
                        self._run_sites(batch)
        group, self._group = self._group, None
        if group is None:
            return
        names = group.names
        x = group.buffer[: len(names)]
        try:
            self._run_stats(names, x, group.tokens)
        except Exception as err:
            self.site_failed(names, f"shape {tuple(x.shape[1:])}, batched", err)

    def _run_stats(self, names: list[str], x: Tensor, tokens: Tokens) -> None:
        """Fold ``x[G, n, D]``, the activations of the ``G`` sites ``names`` over the same tokens,
        into their statistics: one batched update per statistic, in chunks of tokens."""
        pers = [self.window[name] for name in names]
        kinds = list(pers[0])
        if x.dtype != torch.float64 and _kernels.wanted(x):  # CUDA + Triton: one fused float32 kernel for
            # moments, histogram, position (a float64 site takes the float64 moment sums instead)
            kinds = _kernels.update(pers, x, tokens)
        g, n, d = x.shape
        chunked = [k for k in kinds if pers[0][k].chunked]
        if chunked:
            budget = CHUNK_ELEMENTS if x.device.type == "cpu" else CHUNK_ELEMENTS_ACCELERATOR
            step = max(1, budget // max(1, g * d))
            with _wide(x):
                for a in range(0, n, step):
                    xc = x[:, a:a + step]
                    xc = xc.float() if xc.dtype != torch.float32 else xc
                    tc = tokens.slice(a, a + step)
                    for k in chunked:
                        type(pers[0][k]).update_group([per[k] for per in pers], xc, tc)
        for k in kinds:
            if not pers[0][k].chunked:
                type(pers[0][k]).update_group([per[k] for per in pers], x, tokens)

    def _run_stack(self, batch: list[_Deferred]) -> None:
        """Fold small sites ``(name, x[n, D], tokens, hook's tensor)`` of one forward (same tokens,
        same shape) as one stack ``[G, n, D]``: every statistic runs once for all ``G`` sites
        (:meth:`_run_stats`), so a decode step's fixed cost is paid once per forward, not per site.
        States are allocated site by site first (an error there disables that site alone); an
        error in the batched update disables the sites it batched, with one warning."""
        live: list[_Deferred] = []
        for item in batch:
            name, x2, _, source = item
            if name in self.disabled:
                continue
            try:
                one = x2.unsqueeze(0)
                for stat in self.window[name].values():
                    if stat.empty and x2.numel():
                        stat._init_like(one)
            except Exception as err:
                self.site_failed([name], describe(source), err)
                continue
            live.append(item)
        if not live:
            return
        n, d = live[0][1].shape
        dtype = live[0][1].dtype
        buffer = self._stack_buffer
        g = len(live)
        if buffer is None or buffer.dtype != dtype or buffer.numel() < g * n * d:
            buffer = self._stack_buffer = torch.empty(max(g * n * d, 1 << 12), dtype=dtype)
        x = torch.stack([item[1] for item in live], out=buffer[: g * n * d].view(g, n, d))
        names = [item[0] for item in live]
        try:
            self._run_stats(names, x, live[0][2])
        except Exception as err:
            self.site_failed(names, f"shape {(n, d)}, batched", err)

    def _run_sites(self, batch: list[_Deferred]) -> None:
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
                for stat in self.window[name].values():
                    if not stat.chunked:
                        type(stat).update_group([stat], x2.unsqueeze(0), tokens)
            except Exception as err:
                self.site_failed([name], describe(source), err)

        for a in range(0, n, step):
            tc = tokens.slice(a, a + step)
            parts: dict[str, tuple[list[str], list[StatBase], list[Any]]] = {}
            # sites holding one tensor (q/k/v projections' shared input, see Forwards._stage) take
            # one partial result per statistic that allows it (StatBase.share_key)
            shared: dict[tuple, Any] = {}
            for name, x2, _, source in batch:
                if name in self.disabled:
                    continue
                xc = x2[a:a + step]
                xc = (xc.float() if xc.dtype != torch.float32 else xc).unsqueeze(0)
                per = self.window[name]
                try:
                    for k, stat in per.items():
                        if stat.chunked:
                            same = stat.share_key()
                            key = None if same is None else (k, same, x2.data_ptr(), x2.shape, x2.stride(), x2.dtype)
                            part = None if key is None else shared.get(key)
                            if part is None or not type(stat)._ready([stat], xc):
                                with _wide(x2):
                                    part = type(stat).partial(stat, xc, tc)
                                if key is not None and part is not None:
                                    shared[key] = part
                            names, stats, chunks = parts.setdefault(k, ([], [], []))
                            names.append(name)
                            stats.append(stat)
                            chunks.append(part)
                except Exception as err:
                    self.site_failed([name], describe(source), err)
                if step >= n and name not in self.disabled:  # one chunk: the site is still in cache
                    whole(name, x2, source)
            for k, (names, stats, chunks) in parts.items():
                live = [j for j, name in enumerate(names) if name not in self.disabled]
                try:
                    type(stats[0]).fold([stats[j] for j in live], [chunks[j] for j in live])
                except Exception as err:
                    self.site_failed([names[j] for j in live], f"shape {(n, d)}, batched", err)
        if step < n:
            for name, x2, _, source in batch:
                if name not in self.disabled:
                    whole(name, x2, source)
