"""The context manager that attaches probe to a model for the length of a ``with`` block.

Recipe::

    with probe.capture(model, out="run.h5", skip_first=1) as run:
        for batch in loader:
            model(**batch)
    run["hidden_states.5"].kurtosis

Everything is validated before any hook is registered; hooks are registered inside ``try`` and
removed in ``finally``, so the model is left exactly as it was on every exit path.

Hook order within one forward: the root pre-hook reads ``attention_mask`` / ``position_ids`` /
``cache_position`` / ``input_ids``; each site hook detaches its tensor, upcasts it chunk by chunk
to float32 and feeds the statistics on the tensor's own device; the root post-hook closes the
forward (the cross-layer statistic folds in the sites it held).
"""

from __future__ import annotations

import inspect
import os
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from . import kernels as _kernels
from . import stats as _stats
from ._schedule import as_schedule
from .errors import ProbeError, SiteError
from .sites import Site, SiteSpec, resolve

__all__ = ["capture", "Capture", "Handle"]

#: elements per float32 chunk: bounds the temporaries a site's update allocates (16 MiB each on
#: CPU; 256 MiB on accelerators, where fewer, larger kernels matter more than memory)
CHUNK_ELEMENTS = 1 << 22
CHUNK_ELEMENTS_ACCELERATOR = 1 << 26
#: elements of activations that consecutive sites gather (as a float32 copy) before their
#: statistics run as one batch, on accelerators (see ``Capture._group_limit``)
GROUP_ELEMENTS_ACCELERATOR = 1 << 26


@dataclass(frozen=True)
class Handle:
    """One registered hook: which site it serves, where it hangs, and the torch handle."""

    site: str
    module: str
    kind: str
    handle: Any

    def remove(self) -> None:
        self.handle.remove()


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
    seed: int = 0,
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
        sites: ``"hidden_states"`` (default), module names, glob patterns, or a callable
            ``(name, module) -> bool``.
        stats: names from ``("moments", "position", "histogram", "sample", "cross")``; all by default.
        skip_first: drop the first ``k`` real tokens of each sequence from every statistic except
            the per-position ones (which keep all real tokens so the first-token effect shows).
        max_positions: per-position statistics cover positions ``0 .. max_positions - 1``.
        histogram_bits: mantissa bits ``m`` of the histogram buckets; quantiles are within
            ``2**-m / (2 + 2**-m)`` relative error (0.39 % at 7), exact for bf16 data.
        sample_size: ``k`` of the uniform per-site sample for scatter plots.
        cross_budget: bytes of one forward's activations the cross-layer statistic may hold;
            a forward past it is left out of the cross-layer statistic, with a warning.
        seed: seed of the sample's per-forward keys.
        every: commit a window (:meth:`Capture.snapshot`) after every ``every`` forward passes
            of ``model``; ``None`` commits once, at the end. (The HF Trainer callback counts
            optimizer steps instead.)
        phases: record forwards that extend a KV cache (``generate()`` decode steps) under
            separate sites named ``"<site>@decode"``; prefill forwards keep the plain names.
        distributed: under ``torch.distributed``, merge every window across ranks at each
            commit; rank 0 writes ``out`` and every rank gets the merged result. ``None``
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
        ProbeError: bad arguments, unknown sites, an unwritable or existing ``out``; raised
            before any hook is registered or any file is written.

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


def _in_backward() -> bool:
    # gradient checkpointing re-runs forwards of (sub)modules inside the backward pass
    return torch._C._current_graph_task_id() != -1


def _extends_cache(call: dict[str, Any]) -> bool:
    """True when this forward appends to a non-empty KV cache (read from shapes: no host sync)."""
    cache = call.get("past_key_values")
    if cache is None:
        cache = call.get("cache")
    length = getattr(cache, "get_seq_length", None)
    if callable(length):
        try:
            return int(length()) > 0
        except (TypeError, ValueError, IndexError, AttributeError):
            return False
    return False


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
        self.seed = _check_int("seed", seed, 0, "pass a non-negative int")
        self.histogram_bits = _check_int("histogram_bits", histogram_bits, 0, "pass 7")
        _stats.Histogram(histogram_bits)  # validates the range
        names = _stats.NAMES if stats is None else (stats,) if isinstance(stats, str) else tuple(stats)
        unknown = [s for s in names if s not in _stats.NAMES]
        if unknown or not names:
            raise ProbeError(f"unknown stats {unknown or names!r}; expected a subset of {list(_stats.NAMES)}; "
                             "pass e.g. stats=('moments', 'histogram')")
        self.stats = tuple(s for s in _stats.NAMES if s in names)
        self.strict = bool(strict)
        if compile not in (None, True, False):
            raise ProbeError(f"compile must be None, True or False; got {compile!r}; "
                             "pass None to compile on accelerators only")
        self.compile = compile
        self.model = model
        self._defs: list[Site] = resolve(model, sites)
        modules = dict(model.named_modules())
        self._modules = [modules[s.module] for s in self._defs]
        self._names = {"prefill": [s.name for s in self._defs],
                       "decode": [f"{s.name}@decode" for s in self._defs] if self.phases else []}
        self.out = None if out is None else os.fspath(out)
        if self.out is not None and self.rank == 0:
            from . import store

            store.check_writable(self.out, overwrite)
        self.overwrite = overwrite
        try:
            self._signature = inspect.signature(model.forward)
        except (TypeError, ValueError):  # pragma: no cover - builtins without signature
            self._signature = None
        self._handles: list[Handle] = []
        self._writer = None
        self._rows: list = []
        self._committed = 0
        self._thread = threading.get_ident()
        self._warned_thread = False
        self._active = False
        self._off = False  # the current forward is not recorded (schedule)
        self._forward = 0
        self._rows_seen = 0
        self._call: dict[str, Any] | None = None
        self._phase = "prefill"
        self._tokens: dict = {}
        self._disabled: dict[str, str] = {}
        self._dtypes: dict[str, str] = {}
        self._group: dict[str, Any] | None = None
        self._group_elements: int | None = None  # None: by device (see _group_limit)
        self._window = self._new_window()
        self._result = None

    # ----------------------------------------------------------------------------- set-up
    def _new_window(self) -> dict:
        window: dict[str, dict[str, Any]] = {}
        for name in self._names["prefill"] + self._names["decode"]:
            per: dict[str, Any] = {}
            if "moments" in self.stats:
                per["moments"] = _stats.Moments()
            if "position" in self.stats:
                per["position"] = _stats.Position(self.max_positions)
            if "histogram" in self.stats:
                per["histogram"] = _stats.Histogram(self.histogram_bits)
            if "sample" in self.stats:
                per["sample"] = _stats.Sample(self.sample_size)
            for stat in per.values():
                stat.compile = self.compile
            window[name] = per
        old = getattr(self, "_cross", None)
        self._cross = None
        if "cross" in self.stats:
            self._cross = _stats.Cross([s.name for s in self._defs], budget=self.cross_budget)
            self._cross.members = old.members if old is not None else None
        return window

    def meta(self) -> dict[str, Any]:
        """The run's description, stored as the file's root attributes."""
        from . import __version__

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
                 "hf_index": s.hf_index, "dtype": self._dtypes.get(s.name, ""), "phase": phase}
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
        lines += [f"  {h.site:<24} {h.kind:<12} {h.module or '<root>'}" for h in self._handles]
        return "\n".join(lines)

    def __enter__(self) -> Capture:
        if self._active or self._result is not None:
            raise ProbeError("this capture was already entered; expected a fresh one per with-block; "
                             "call probe.capture(model, ...) again")
        if self.out is not None and self.rank == 0:
            from . import store

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
        root = self.model
        h = root.register_forward_pre_hook(self._begin, with_kwargs=True, prepend=True)
        self._handles.append(Handle("<forward>", "", "pre-root", h))
        for i, (site, module) in enumerate(zip(self._defs, self._modules)):
            if site.read == "input":
                h = module.register_forward_pre_hook(self._make_pre(i), with_kwargs=True)
                kind = "pre"
            else:
                h = module.register_forward_hook(self._make_post(i))
                kind = "post"
            self._handles.append(Handle(site.name, site.module, kind, h))
        h = root.register_forward_hook(self._end)
        self._handles.append(Handle("<forward>", "", "post-root", h))

    def _remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            self._remove()
        finally:
            self._active = False
            try:
                self._commit(final=True)
            except Exception as err:
                if exc is None:
                    raise
                warnings.warn(f"probe: could not save the last window while handling {exc_type.__name__}: {err}",
                              stacklevel=2)
        return False

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

    def _foreign_thread(self) -> bool:
        """Statistics are not thread-safe: forwards on threads other than the one that entered are
        ignored, with one warning (run one capture per thread, on separate model replicas)."""
        if threading.get_ident() == self._thread:
            return False
        if not self._warned_thread:
            self._warned_thread = True
            warnings.warn("probe: a forward ran on another thread than the one that entered capture(); "
                          "its activations are not recorded; enter a separate capture in each thread",
                          stacklevel=3)
        return True

    @_eager
    def _begin(self, module, args, kwargs) -> None:
        if _in_backward() or self._foreign_thread():
            return
        self._flush_group()
        self._finish_cross()
        self._forward += 1
        self._off = self.schedule is not None and not self.schedule(self._forward - 1)
        if self._off:
            return
        call: dict[str, Any] = dict(kwargs)
        if args and self._signature is not None:
            try:
                call.update(self._signature.bind_partial(*args, **kwargs).arguments)
            except TypeError:
                pass
        self._call = {k: call.get(k) for k in ("attention_mask", "position_ids", "cache_position",
                                              "input_ids", "inputs_embeds")}
        self._phase = "decode" if self.phases and _extends_cache(call) else "prefill"
        self._tokens = {}

    @_eager
    def _end(self, module, args, output) -> None:
        if _in_backward() or self._foreign_thread():
            return
        if self._off:
            self._off = False
        else:
            self._flush_group()
            self._finish_cross()
            self._rows_seen += self._batch_rows()
            self._call = None
        if self.every is not None and self._forward % self.every == 0:
            self._commit()

    def _batch_rows(self) -> int:
        """Sequences in this forward: from the inputs, else from the first site's shape."""
        for key in ("input_ids", "inputs_embeds"):
            t = (self._call or {}).get(key)
            if isinstance(t, Tensor) and t.dim() >= 2:
                return t.shape[0]
        return next(iter(self._tokens))[0] if self._tokens else 0

    def _make_pre(self, i: int):
        def hook(module, args, kwargs):
            if self._off:
                return
            x = args[0] if args else kwargs.get("hidden_states")
            self._observe(i, x)

        return hook

    def _make_post(self, i: int):
        site = self._defs[i]

        def hook(module, args, output):
            if self._off:
                return
            if site.read == "last_hidden_state":
                x = getattr(output, "last_hidden_state", None)
                if x is None and isinstance(output, (tuple, list)) and output:
                    x = output[0]
            elif isinstance(output, (tuple, list)):
                x = output[site.index] if len(output) > site.index else None
            elif isinstance(output, Tensor):
                x = output
            else:  # a ModelOutput or other mapping: its first tensor, as transformers' to_tuple() would
                x = next((v for v in getattr(output, "values", lambda: [])() if isinstance(v, Tensor)), None)
            self._observe(i, x)

        return hook

    def _tokens_for(self, b: int, t: int, device: torch.device):
        memo = (b, t, device)
        if memo in self._tokens:
            return self._tokens[memo]
        call = self._call or {}
        mask = call.get("attention_mask")
        if isinstance(mask, Tensor) and mask.dim() == 2 and mask.shape[0] == b and mask.shape[1] >= t:
            full = mask.to(device)
            valid = full[:, -t:].bool()
        else:
            full, valid = None, torch.ones(b, t, dtype=torch.bool, device=device)
        pos_ids, cache_pos = call.get("position_ids"), call.get("cache_position")
        head_bound = b * min(self.skip_first, t)  # at most skip_first head tokens per sequence...
        if (isinstance(pos_ids, Tensor) and pos_ids.dim() == 2 and pos_ids.shape[-1] == t
                and pos_ids.shape[0] in (1, b)):
            position = pos_ids.to(device).long().expand(b, t)
            head_bound = -1  # ...unless the caller's position_ids restart inside a sequence
        elif full is not None:
            position = (full.long().cumsum(-1) - 1)[:, -t:]
        elif isinstance(cache_pos, Tensor) and cache_pos.dim() == 1 and cache_pos.shape[0] == t:
            position = cache_pos.to(device).long().expand(b, t)
        else:
            position = torch.arange(t, device=device).expand(b, t)
        ids = call.get("input_ids")
        if isinstance(ids, Tensor) and ids.dim() == 2 and ids.shape[0] == b and ids.shape[1] >= t:
            token = ids[:, -t:].to(device).long()
        else:
            token = torch.full((b, t), -1, dtype=torch.int64, device=device)
        row = (self._rows_seen + torch.arange(b, device=device)).unsqueeze(1).expand(b, t)
        keep = valid & (position >= self.skip_first)
        cache = next(iter(self._tokens.values())).cache if self._tokens else {}
        tokens = _stats.Tokens(valid.reshape(-1), keep.reshape(-1), position.reshape(-1),
                               row.reshape(-1), token.reshape(-1), self._forward,
                               hash((self.seed, self.rank, self._forward)) & ((1 << 62) - 1), 0,
                               head_bound, cache)
        self._tokens[memo] = tokens
        return tokens

    @_eager
    def _observe(self, i: int, x: Any) -> None:
        # a gradient-checkpointing recompute (in backward) re-runs tokens that were counted already
        if _in_backward() or self._foreign_thread():
            return
        name = self._names[self._phase][i]
        if name in self._disabled:
            return
        try:
            if self._call is None:  # a submodule called on its own: treat it as one forward
                self._begin(self.model, (), {})
            self._update(i, name, x)
        except Exception as err:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            dtype = str(x.dtype).replace("torch.", "") if isinstance(x, Tensor) else "-"
            message = f"site {name!r} (shape {shape}, dtype {dtype}): {err}"
            if self.strict:
                raise SiteError(message) from err
            self._disabled[name] = str(err)
            warnings.warn(f"probe: {message}; this site is disabled for the rest of the run", stacklevel=2)

    @torch.no_grad()
    def _update(self, i: int, name: str, x: Any) -> None:
        if not isinstance(x, Tensor):
            raise SiteError(f"the module produced {type(x).__name__}, not a tensor; "
                            "choose a module whose output (or output[0]) is a tensor")
        if not (x.is_floating_point()):
            raise SiteError(f"expected a floating-point tensor, got {x.dtype}; "
                            "capture a module that outputs activations")
        if x.dim() < 3:
            raise SiteError("expected [batch, sequence, ...] activations; "
                            "capture a module whose output keeps the batch and sequence dims")
        x = x.detach()
        self._dtypes.setdefault(self._defs[i].name, str(x.dtype).replace("torch.", ""))
        b, t = x.shape[0], x.shape[1]
        x2 = x.reshape(b * t, x.shape[2:].numel())
        tokens = self._tokens_for(b, t, x.device)
        if self._cross is not None and self._phase == "prefill":
            self._cross.hold(i, x2, tokens)
        limit = self._group_limit(x2.device)
        if limit and 2 * x2.numel() <= limit:
            self._group_add(name, x2, tokens, limit)
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
        group, self._group = self._group, None
        if group is None:
            return
        names = group["names"]
        x = group["buffer"][: len(names)]
        try:
            self._run_stats(names, x, group["tokens"])
        except Exception as err:
            message = f"sites {names} (shape {tuple(x.shape[1:])}, batched): {err}"
            if self.strict:
                raise SiteError(message) from err
            for name in names:
                self._disabled[name] = str(err)
            warnings.warn(f"probe: {message}; these sites are disabled for the rest of the run", stacklevel=2)

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

    # ------------------------------------------------------------------------- snapshots
    def snapshot(self, step: int | None = None) -> None:
        """Commit the current window as one row (flushed to ``out``) and start a new window.

        Args:
            step: the row's label (e.g. the optimizer step); defaults to the number of forwards.
        """
        self._commit(step=step)

    def _commit(self, step: int | None = None, final: bool = False) -> None:
        self._flush_group()
        self._finish_cross()
        if final and self._committed and all(not st.state_dict() for per in self._window.values()
                                             for st in per.values()):
            self._finish_result()
            return
        row = {
            "step": self._forward if step is None else int(step),
            "sites": {name: {k: {f: v.detach().cpu().numpy() for f, v in st.state_dict().items()}
                             for k, st in per.items()} for name, per in self._window.items()},
            "cross": ({f: v.cpu().numpy() for f, v in self._cross.state_dict().items()}
                      if self._cross is not None else {}),
        }
        meta = self.meta()
        if self.world > 1:
            import torch.distributed as dist

            from .run import merge_rows

            rows: list = [None] * self.world
            dist.all_gather_object(rows, row)
            row = merge_rows(rows, meta["cross_sites"])
            row["step"] = rows[0]["step"]
        if self._writer is not None:
            self._writer.append(meta, row)
        elif self.out is not None:  # another rank's file is written by rank 0: keep a running total
            from .run import merge_rows

            self._rows = [merge_rows(self._rows + [row], meta["cross_sites"])]
        else:
            self._rows.append(row)
        self._window = self._new_window()
        self._committed += 1
        if final:
            self._finish_result()

    def _finish_result(self) -> None:
        from .run import Run

        if self._writer is not None:
            from .store import read

            self._result = read(self.out)
        else:
            self._result = Run(self.meta(), self._rows)

    # ---------------------------------------------------------------- results after exit
    @property
    def result(self):
        """The :class:`probe.run.Run` after the block (``None`` while capturing)."""
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

    @property
    def sites(self) -> list[str]:
        """Site names in capture order (available before, during and after the block)."""
        return self._names["prefill"] + self._names["decode"]

