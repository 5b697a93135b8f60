"""One forward's life: it begins (the model's or a stack's pre-hook), its sites' tensors are staged
as they come, and it ends — folded into the statistics as a whole at the model's post-hook — or
stops half-way (it raised) and counts nowhere.

Recipe (what :class:`probe.capture.session.Capture` does)::

    forwards = Forwards(hooks, names, engine, recorder, options, forward_signature(model))
    hooks.attach(forwards.begin, forwards.end, forwards.enter, forwards.leave, forwards.observe,
                 forwards.open, forwards.close, forwards.arrive)

A model whose ``forward`` is called directly (not through ``__call__``, so its own hooks do not
fire) still has one forward per call: it opens at the call of the first site's module inside it
(the first layer, whose input is ``hidden_states.0``) and closes at the last site's hook; the
per-layer call counting restarts there. Its tokens are described by the arguments of the model's
``forward`` as its running frame holds them (the call the model's pre-hook would have read; a
mask the model replaced by its 4-D form is read as such, see :mod:`probe.capture.tokens`), else
by the first layer's own call. With modules named in ``sites=`` (whose order in a forward is not
known) the forward opens at the first site's module that runs inside a frame of the model's
``forward`` (:meth:`Forwards.arrive`), or at a stack called inside that frame (a head's base model,
whose pre-hook runs before any site's: :meth:`Forwards.enter`), and is that frame's, described by
its arguments: it is settled (:meth:`Forwards.settle`)
once the frame has finished — at the next forward, ``snapshot()`` or exit. A forward that raised
is known by the next forward's new frame, and left out whole; without a Python frame, when the
first site's module has been called more often than in a whole forward.

Threads: the statistics are not thread-safe, so only the thread that entered the capture is
recorded. A forward on any other thread (a background evaluation, ``nn.DataParallel``'s replicas)
is ignored, with one warning, and touches none of the capture's state: not the call counts, not
the forward count, not the open forward of the entering thread.

A site's tensor is laid out as ``[batch, sequence, ...]`` (``Site.layout``, ``Site.spatial``; a
NestedTensor padded back), its tokens are read from the call of its own stack
(:mod:`probe.capture.tokens`), and it is held until the forward ends (up to ``cross_budget`` bytes; past it, sites fold in at once): on CPU as a copy in a
buffer reused across forwards, on accelerators by reference.
A submodule called on its own, with no model or stack call around it, folds in at once. Nothing
here reads a device value on the host; errors disable one site with one warning (``strict``:
raise), never the model's forward. The tensors go to the statistics through
:class:`probe.capture.engine.StatEngine`; the forwards are counted, and windows committed after
them, by a :class:`ForwardCounter` (:class:`probe.capture.window.Recorder`).
"""

from __future__ import annotations

import dis
import inspect
import signal
import sys
import threading
import warnings
from collections.abc import Callable
from dataclasses import replace
from types import FrameType
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from ..errors import SiteError
from ..stats import _base as _stats_base
from .engine import StatEngine
from .grads import Grads
from .hooks import HookSet, token_source
from .options import CaptureOptions
from .parallel import Placements
from .sites import as_tokens, discovering
from .tokens import CallInputs, TokenContext, read_call

__all__ = ["Forwards", "ForwardCounter", "forward_signature"]


class ForwardCounter(Protocol):
    """What one forward's life needs from the windows: the forward count and ``every=``."""

    @property
    def forwards(self) -> int:
        """Forwards of the model so far, the ones the schedule skips included."""
        ...

    def count_forward(self) -> int:
        """A forward begins; returns its number (1-based)."""
        ...

    def forward_ended(self) -> None:
        """A forward ended (recorded or skipped): commit a window if ``every=`` says so."""
        ...


#: the owner of a forward that the first site's module opened (the model's forward called directly)
SITES = "<sites>"
#: the owner of a forward that a frame of the model's ``forward`` holds (called directly, named sites)
FRAME = "<frame>"


#: what torch.compile(..., fullgraph=True) says when it meets one of probe's hooks (it cannot break there)
EAGER_REASON = ("probe's hooks run eagerly at a graph break; compile without fullgraph=True while "
                "probe.capture is open")


def _eager(fn: Callable) -> Callable:
    """Keep torch.compile out of probe's hooks: they run eagerly at a graph break, so a model
    compiled inside the with-block is captured exactly and the hooks' Python is never traced."""
    try:
        return torch.compiler.disable(fn, recursive=True, reason=EAGER_REASON)
    except TypeError:  # an older torch takes no reason
        return torch.compiler.disable(fn, recursive=True)



class _HeldInterrupt:
    """While probe folds activations into statistics, a Ctrl-C is held and delivered right after,
    so a site's statistics are updated together or not at all (a site whose moments saw a chunk
    that its histogram did not would make the run file fail validation). Only in the main thread
    and only while SIGINT has Python's default handler; any other handler is left alone."""

    def __init__(self) -> None:
        self._held: tuple[int, FrameType | None] | None = None
        self._depth = 0  # nested holds: the outermost one installs and delivers
        self._active = False

    def _hold(self, signum: int, frame: FrameType | None) -> None:
        self._held = (signum, frame)

    def __enter__(self) -> _HeldInterrupt:
        self._depth += 1
        if self._depth == 1:
            self._held = None
            self._active = (threading.current_thread() is threading.main_thread()
                            and signal.getsignal(signal.SIGINT) is signal.default_int_handler)
            if self._active:
                signal.signal(signal.SIGINT, self._hold)
        return self

    def __exit__(self, *exc: object) -> None:
        self._depth -= 1
        if self._depth or not self._active:
            return
        self._active = False
        signal.signal(signal.SIGINT, signal.default_int_handler)
        held, self._held = self._held, None
        if held is not None and exc[0] is None:
            signal.default_int_handler(*held)  # raises KeyboardInterrupt, now that the fold is whole


def forward_signature(model: nn.Module) -> inspect.Signature | None:
    """The signature of ``model.forward`` (binds positional token inputs), ``None`` for builtins."""
    try:
        return inspect.signature(model.forward)
    except (TypeError, ValueError):  # builtins without a signature
        return None


def _forward_codes(model: nn.Module) -> frozenset:
    """The code objects of ``model``'s ``forward`` and of every wrapper around it (``__wrapped__``)."""
    codes = set()
    fn = getattr(type(model), "forward", None)
    for _ in range(16):
        code = getattr(fn, "__code__", None)
        if code is None:
            break
        codes.add(code)
        fn = getattr(fn, "__wrapped__", None)
    return frozenset(codes)


def _running_frame(model: nn.Module, codes: frozenset) -> FrameType | None:
    """The innermost running frame of ``model.forward`` (``codes``: :func:`_forward_codes`) on the
    calling thread's stack, when a hook runs inside it; ``None`` when none is."""
    frame: FrameType | None = sys._getframe(1)
    for _ in range(64):
        if frame is None:
            return None
        if frame.f_code in codes and frame.f_locals.get("self") is model:
            return frame
        frame = frame.f_back
    return None


def _frame_call(frame: FrameType) -> dict[str, Any]:
    """The arguments of a ``forward`` as its frame holds them now (its ``**kwargs`` merged in)."""
    local = frame.f_locals
    call = {k: v for k, v in local.items() if k != "self"}
    extra = local.get("kwargs")
    if isinstance(extra, dict):
        call.update({k: v for k, v in extra.items() if k not in call})
    return call


def _running_call(model: nn.Module, codes: frozenset) -> dict[str, Any] | None:
    """The arguments of ``model.forward`` as its running frame holds them now, when a hook runs
    inside it; ``None`` when no frame of it is on the stack."""
    frame = _running_frame(model, codes)
    return None if frame is None else _frame_call(frame)


def _on_stack(frame: FrameType) -> bool:
    """Whether ``frame`` is still running on the calling thread."""
    f: FrameType | None = sys._getframe(1)
    while f is not None:
        if f is frame:
            return True
        f = f.f_back
    return False


#: the opcodes a function's frame stops at when it returned (not when it raised)
_RETURNS = frozenset(dis.opmap[n] for n in ("RETURN_VALUE", "RETURN_CONST") if n in dis.opmap)


def _returned(frame: FrameType) -> bool:
    """Whether a finished frame returned; a frame that raised stops at the raising instruction
    (``f_lasti``, the offset of the last instruction run, in bytes)."""
    code, last = frame.f_code.co_code, frame.f_lasti
    return 0 <= last < len(code) and code[last] in _RETURNS


#: model types whose layers run ``[sequence, batch, ...]`` inside a batch-first model
_SEQUENCE_FIRST = frozenset({"xlnet", "transfo-xl"})


def _batch_first(module: nn.Module) -> bool | None:
    """A module's own word on its layout: ``batch_first`` of it, its ``self_attn`` or its first
    layer's (``nn.MultiheadAttention``, ``nn.Transformer*``); ``None`` when it says nothing."""
    layers = getattr(module, "layers", None)
    first = layers[0] if isinstance(layers, nn.ModuleList) and len(layers) else None
    for m in (module, getattr(module, "self_attn", None), first, getattr(first, "self_attn", None)):
        said = getattr(m, "batch_first", None)
        if isinstance(said, bool):
            return said
    return None


def _frames(module: nn.Module, call: dict[str, Any], inputs: CallInputs) -> CallInputs:
    """An audio model's call whose ``attention_mask`` covers the clip's samples (``input_values``
    ``[batch, samples]``): its frames' mask, as the model itself derives it
    (``_get_feature_vector_attention_mask`` of Wav2Vec2 and its kin: the first
    ``_get_feat_extract_output_lengths(real samples)`` frames of each row are real; no adapter, as
    for the encoder's states); any other call as it is."""
    values, mask = call.get("input_values"), call.get("attention_mask")
    if not (isinstance(values, Tensor) and isinstance(mask, Tensor) and mask.dim() == 2
            and values.dim() == 2 and tuple(mask.shape) == tuple(values.shape)):
        return inputs
    for m in (module, getattr(module, "base_model", None)):
        to_frames = getattr(m, "_get_feature_vector_attention_mask", None)
        lengths = getattr(m, "_get_feat_extract_output_lengths", None)
        if not (callable(to_frames) and callable(lengths)):
            continue
        try:
            frames = lengths(torch.tensor(values.shape[1]), add_adapter=False)
            frame_mask = to_frames(int(frames), mask, add_adapter=False)
        except TypeError:  # a model whose helpers take no add_adapter
            frames = lengths(torch.tensor(values.shape[1]))
            frame_mask = to_frames(int(frames), mask)
        return replace(inputs, mask=frame_mask.bool(), position_ids=None)
    return inputs


def _in_backward() -> bool:
    # gradient checkpointing re-runs forwards of (sub)modules inside the backward pass
    return torch._C._current_graph_task_id() != -1


def _same_values(copy: Tensor, x: Tensor) -> bool:
    """Whether ``copy`` (a held copy, float32 for a 16-bit ``x``) holds exactly ``x``'s values
    (a NaN never compares equal: such a tensor is copied again)."""
    return torch.equal(copy, x) if copy.dtype == x.dtype else bool(torch.eq(copy, x).all())


def _version(x: Tensor) -> int:
    # inference tensors (torch.inference_mode) carry no version counter and cannot change later
    return -1 if x.is_inference() else x._version


class Forwards:
    """The per-forward state of one capture (see the module docstring).

    Args:
        hooks: the capture's hook set (its sites, the model, the per-forward call state).
        names: the site names per phase (``"prefill"``, ``"decode"``), in site order.
        engine: the statistics the sites' tensors are folded into.
        counter: counts the forwards and commits windows after them (``every=``).
        options: ``seed``, ``rank``, ``skip_first``, ``phases``, ``cross_budget``, ``schedule``.
        signature: the model's ``forward`` signature (:func:`forward_signature`).
    """

    def __init__(self, hooks: HookSet, names: dict[str, list[str]], engine: StatEngine, counter: ForwardCounter,
                 options: CaptureOptions, signature: inspect.Signature | None, grads: Grads | None = None) -> None:
        self._grads = grads  # capture(grads=True): a gradient hook on each site's tensor
        self._interrupt = _HeldInterrupt()
        self._hooks = hooks
        self._defs = hooks.sites
        self._names = names
        self._engine = engine
        self._counter = counter
        self._options = options
        self._sources = [token_source(s) for s in self._defs]
        self._signature = signature
        #: the thread that entered the capture: forwards on others are ignored (see _foreign_thread)
        self.thread = threading.get_ident()
        #: the dtype each site's tensor arrived in (its first forward), for the run's description
        self.dtypes: dict[str, str] = {}
        self._warned_thread = False
        self._rows_seen = 0
        #: the model's token inputs while one of its forwards runs, else ``None``
        self.call: dict[str, Any] | None = None
        self._phase = "prefill"
        self._context: TokenContext | None = None
        self._owner: str | None = None  # who ends the forward: "" the model, a stack's path, None nobody
        self._off_owner: str | None = None  # who ends a forward the schedule skips
        self._recorded = 0  # forwards recorded (not skipped by the schedule)
        self._pending: list = []  # this forward's site tensors, folded in when it ends (all or nothing)
        self._pending_bytes = 0
        #: this forward's held copies by what they copied (see _stage): sites that read one tensor share one
        self._staged: dict[tuple, Tensor] = {}
        self._dropped = 0
        self._copy: set[int] = set()  # sites whose tensor the model modifies in place: copied at the hook
        self._held: dict[int, Tensor] = {}  # CPU: each site's reused buffer (see _hold)
        self._fired: set[int] = set()
        #: a forward of the model had no input_ids (a later pipeline stage: token ids are -1)
        self.without_ids = False
        self._real: dict[int, Tensor] = {}  # real tokens seen per site (device counters, read at exit)
        self._signatures: dict[int, inspect.Signature | None] = {}
        self._seq_first: dict[int, bool] = {}  # named sites whose layout a call's shapes showed
        self._codes = _forward_codes(hooks.model)
        self._opener_calls = 0  # calls of the opening module in the forward it opened, so far
        self._opener_whole: int | None = None  # ... and in the last one that ended
        #: the frame of the model's ``forward`` a SITES or FRAME forward runs in (it ends with it)
        self._frame: FrameType | None = None
        #: which part of each site's global tensor this rank holds (:mod:`probe.capture.parallel`)
        self.placements: Placements | None = None

    def _foreign_thread(self) -> bool:
        """Statistics are not thread-safe: forwards on threads other than the one that entered are
        ignored, with one warning (run one capture per thread, on separate model replicas)."""
        if threading.get_ident() == self.thread:
            return False
        if not self._warned_thread:
            self._warned_thread = True
            warnings.warn("probe: a forward ran on another thread than the one that entered capture(); "
                          "its activations are not recorded; enter a separate capture in each thread",
                          stacklevel=3)
        return True

    def _skip(self) -> bool:
        # a gradient-checkpointing recompute (in backward) re-runs tokens that were counted already;
        # probe's own discovery forward (another capture being set up) is not the user's data
        return _in_backward() or discovering() or self._foreign_thread()

    def _bind(self, module: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
        call: dict[str, Any] = dict(kwargs)
        if args:
            try:
                if module is self._hooks.model:
                    signature = self._signature
                elif id(module) in self._signatures:
                    signature = self._signatures[id(module)]
                else:
                    signature = self._signatures[id(module)] = forward_signature(module)
                if signature is not None:
                    call.update(signature.bind_partial(*args, **kwargs).arguments)
            except (TypeError, ValueError):
                pass
        return call

    def _start(self, owner: str | None) -> TokenContext:
        """A forward begins: drop what an unfinished one left, open a token context."""
        with self._interrupt:
            self._engine.flush()
            self._engine.finish_cross()
        if self._pending:
            self._drop_pending()
        forward = self._counter.count_forward()
        self._recorded += 1
        self._owner = owner
        self._phase = "prefill"
        options = self._options
        seed = hash((options.seed, options.rank, forward)) & ((1 << 62) - 1)
        context = self._context = TokenContext(forward, self._rows_seen, options.skip_first, seed)
        self._hooks.active.clear()
        return context

    def _drop_pending(self) -> None:
        self._pending, self._pending_bytes, self._staged = [], 0, {}
        self._dropped += 1
        if self._dropped == 1:
            warnings.warn("probe: a forward stopped before it finished (it raised); none of its tokens enter "
                          "any statistic (each forward counts whole or not at all)", stacklevel=5)

    def _scheduled_off(self, owner: str) -> bool:
        """Whether the forward beginning now is one ``schedule=`` skips; if so it is counted (for
        ``every=`` and the default step labels) and the site hooks return at once until it ends."""
        schedule = self._options.schedule
        if schedule is None or schedule(self._counter.forwards):
            return False
        if self._pending:
            self._drop_pending()
        self._counter.count_forward()
        self._hooks.off = True
        self._off_owner = owner
        return True

    def _close_off(self) -> None:
        self._hooks.off = False
        self._off_owner = None
        self._hooks.reset("")
        self._counter.forward_ended()

    # the hooks' entry points (kept eager)
    @_eager
    def begin(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._skip():
            return
        self.settle()
        if self._scheduled_off(""):
            return
        context = self._start("")
        call = self._bind(module, args, kwargs)
        inputs = _frames(module, call, read_call(call))
        context.calls[""] = inputs
        self.without_ids = self.without_ids or inputs.input_ids is None
        if "decoder_" in self._sources:
            context.calls["decoder_"] = read_call(call, "decoder_")
        self.call = {k: call.get(k) for k in ("attention_mask", "position_ids", "cache_position",
                                             "input_ids", "inputs_embeds")}
        self._phase = "decode" if self._options.phases and inputs.past else "prefill"
        self._hooks.reset("")
        self._hooks.active.append("")

    @_eager
    def end(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self._skip():
            return
        if self._hooks.off:
            if self._off_owner == "":
                self._close_off()
            return
        if self._owner != "":
            return
        if output is None:  # the forward raised (this hook is always called)
            self._abort()
        else:
            self._finish()

    @_eager
    def open(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """The first site's module inside the model is called: with no forward open, the model's
        ``forward`` was called directly, and this call's inputs describe its tokens."""
        owner = self._off_owner if self._hooks.off else self._owner
        if owner is not None and owner != SITES:  # the model's or a stack's forward is open
            return
        if self._skip():
            return
        frame = _running_frame(self._hooks.model, self._codes)
        if owner == SITES:
            self._opener_calls += 1
            whole = self._opener_whole
            if self._frame is not None and frame is not None:
                later = frame is self._frame  # the frame it opened in still runs
            else:  # no Python frame of the model's forward: a whole forward's calls say it
                later = whole is None or self._opener_calls <= whole
            if later:
                return  # a later call of the module within the same forward
            # the open forward never reached its last site: it raised
            self._frame = None
            self._close_off() if self._hooks.off else self._abort()
        self._opener_calls = 1
        self._frame = frame
        # no reset of the call counts here: they restart when a forward ends, so the calls of a
        # module before the first layer (a norm of the embeddings) count in this one
        if self._scheduled_off(SITES):
            return
        context = self._start(SITES)
        # the model's forward is not a Python frame: the first layer's call says it
        call = self._bind(module, args, kwargs) if frame is None else _frame_call(frame)
        inputs = context.calls[""] = _frames(self._hooks.model, call, read_call(call, layer=True))
        self._phase = "decode" if self._options.phases and inputs.past else "prefill"

    @_eager
    def close(self) -> None:
        """The last site inside the model fired: a forward :meth:`open` opened ends."""
        if self._hooks.off:
            if self._off_owner == SITES and not self._skip():
                self._opener_whole = self._opener_calls
                self._frame = None
                self._close_off()
            return
        if self._owner == SITES and not self._skip():
            self._opener_whole = self._opener_calls
            self._frame = None
            self._finish()

    @_eager
    def arrive(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """A site's module is called, in a capture whose sites' order is unknown (named modules):
        inside a frame of the model's ``forward`` with no forward open, the model's ``forward``
        was called directly, and a forward opens, described by that frame's arguments; it ends
        with the frame, settled at the next forward, ``snapshot()`` or exit (:meth:`settle`)."""
        owner = self._off_owner if self._hooks.off else self._owner
        if owner is not None and owner != FRAME:  # the model's or a stack's forward is open
            return
        if self._skip():
            return
        frame = _running_frame(self._hooks.model, self._codes)
        if owner == FRAME:
            if frame is self._frame:
                return  # a later site of the same forward
            self._settle()
        if frame is None:  # a submodule called on its own: observe folds it in at once
            return
        self._open_frame(frame)

    def _open_frame(self, frame: FrameType) -> TokenContext | None:
        """Open the forward that ``frame`` (a running frame of the model's ``forward``) holds, described
        by the frame's arguments; ``None`` when the schedule skips it. Opened by the first named site's
        module (:meth:`arrive`) or by a stack called inside the frame (:meth:`enter`: a head model's
        base model, whose own mask describes only its stack's sites)."""
        self._frame = frame
        if self._scheduled_off(FRAME):
            return None
        context = self._start(FRAME)
        call = _frame_call(frame)
        inputs = context.calls[""] = _frames(self._hooks.model, call, read_call(call))
        self._phase = "decode" if self._options.phases and inputs.past else "prefill"
        return context

    def settle(self) -> None:
        """End a forward that a frame of the model's ``forward`` holds, if that frame finished: folded in
        if it returned, left out (one warning) if it raised. Called before another forward begins,
        at ``snapshot()`` and at exit."""
        frame = self._frame
        owner = self._off_owner if self._hooks.off else self._owner
        if frame is None or owner != FRAME or _on_stack(frame):
            return
        self._settle()

    def _settle(self) -> None:
        frame, self._frame = self._frame, None
        if self._hooks.off:
            self._close_off()
        elif frame is not None and _returned(frame):
            self._finish()
        else:
            self._abort()

    @_eager
    def enter(self, name: str, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """A stack (encoder, decoder) begins: its own mask describes its tensors."""
        if self._skip():
            return
        self.settle()
        if self._hooks.off:
            return
        context = self._context
        alone = context is None or self._owner is None
        if alone:
            frame = _running_frame(self._hooks.model, self._codes) if self._hooks.opener is None else None
            if frame is not None:  # the model's forward called directly, with named sites: its frame's forward
                context = self._open_frame(frame)
                if context is None:
                    return
                alone = False
            else:  # the stack called on its own: a forward of its own
                if self._scheduled_off(name):
                    return
                context = self._start(name)
        assert context is not None
        call = self._bind(module, args, kwargs)
        inputs = _frames(module, call, read_call(call))
        if inputs.mask is None and inputs.unreadable is None:
            inputs = self._borrow_mask(call, inputs, alone)
        context.calls[name] = inputs
        if alone:
            self._phase = "decode" if self._options.phases and inputs.past else "prefill"
        self._hooks.reset(name)
        self._hooks.active.append(name)

    def _borrow_mask(self, call: dict[str, Any], inputs: CallInputs, alone: bool) -> CallInputs:
        """A stack called without a mask but with the very token tensor the model's call got (a
        head that passes its base model the ids, not the mask: RwkvForCausalLM): the model's
        call says which of these tokens are padding. The model's call is its pre-hook's, or, with
        ``forward`` called directly, its running frame's."""
        outer_call = None if alone else self.call
        if outer_call is None:  # called alone, or in a forward its frame holds (FRAME)
            frame = _running_frame(self._hooks.model, self._codes)
            outer_call = None if frame is None else _frame_call(frame)
        if outer_call is None:
            return inputs
        ids, embeds = call.get("input_ids"), call.get("inputs_embeds")
        same = (ids is outer_call.get("input_ids") if isinstance(ids, Tensor)
                else isinstance(embeds, Tensor) and embeds is outer_call.get("inputs_embeds"))
        if not same:
            return inputs
        outer = read_call(outer_call)
        if outer.mask is None or outer.unreadable is not None:
            return inputs
        return replace(inputs, mask=outer.mask,
                       position_ids=outer.position_ids if inputs.position_ids is None else inputs.position_ids)

    @_eager
    def leave(self, name: str, output: Any) -> None:
        if self._skip():
            return
        if self._hooks.off:
            if self._off_owner == name:
                self._close_off()
            return
        if name in self._hooks.active:
            self._hooks.active.remove(name)
        if self._owner == name:
            self._abort() if output is None else self._finish()

    def _abort(self) -> None:
        """The forward raised half-way: none of its tensors enter any statistic."""
        if self._pending:
            self._drop_pending()
        self.call = None
        self._context = None
        self._owner = None
        self._hooks.active.clear()
        self._hooks.reset("")

    def _finish(self) -> None:
        """The forward ended: fold in every site it produced, then close it (a Ctrl-C meanwhile
        is delivered after the fold, see :class:`_HeldInterrupt`)."""
        with self._interrupt:
            try:
                self._fold_pending()
            finally:
                self._engine.flush()
                self._engine.finish_cross()
                if self._context is not None:
                    self._rows_seen += self._context.rows()
                self.call = None
                self._context = None
                self._owner = None
                self._hooks.active.clear()
                self._hooks.reset("")  # between forwards no call is counted (see open)
        self._counter.forward_ended()

    def _fold_pending(self) -> None:
        pending, self._pending, self._pending_bytes, self._staged = self._pending, [], 0, {}
        # sites held by reference (version recorded) that the model changed in place after the hook
        moved = [i for i, _, x, version, _, _ in pending if version is not None and _version(x) != version]
        if moved:
            # this forward cannot be counted exactly; from now on these sites are copied at the hook
            stale = [self._defs[i].name for i in moved]
            self._copy.update(moved)
            self._dropped += 1
            warnings.warn(f"probe: sites {stale} were modified in place after their hook; this forward is left "
                          "out of every statistic, and these sites are copied at the hook from now on",
                          stacklevel=3)
            return
        engine = self._engine
        with torch.inference_mode(False), torch.no_grad():
            while pending:
                i, name, x2, _, tokens, x = pending.pop(0)
                engine.guarded(name, x, lambda: engine.fold(i, name, x2, tokens, self._phase, ended=x))

    @_eager
    def observe(self, i: int, x: Any) -> None:
        if self._hooks.off or self._skip():
            return
        context = self._context
        if context is None:  # a submodule called on its own: one forward, nobody ends it
            context = self._start(None)
        name = self._names[self._phase][i]
        self._fired.add(i)
        self._engine.guarded(name, x, lambda: self._stage(i, name, x, context))

    def _stage(self, i: int, name: str, x: Any, context: TokenContext) -> None:
        """Check and lay out the site's tensor, find its tokens; keep it until the forward ends."""
        site = self._defs[i]
        place, length, placements = None, None, self.placements
        if placements is not None and isinstance(x, Tensor):  # a DTensor, or a described plain tensor
            length = x.shape[1] if x.dim() > 1 and type(x) is not Tensor else None  # a DTensor's global length
            x, place = placements.local(i, x)
            if place is not None and not place.counts:
                return  # another rank of its group counts this replica
        if isinstance(x, Tensor) and x.is_nested:
            x = self._unnest(i, x, context)
        if isinstance(x, str):  # a packed site (probe.capture.moe) that could not read its call
            raise SiteError(x)
        if not isinstance(x, Tensor):
            raise SiteError(f"the module produced {type(x).__name__}, not a tensor; "
                            "choose a module whose output (or output[0]) is a tensor")
        if not x.is_floating_point():
            raise SiteError(f"expected a floating-point tensor, got {x.dtype}; "
                            "capture a module that outputs activations")
        if x.dim() < 2:
            raise SiteError("expected [batch, sequence, ...] or [batch·sequence, ...] activations; "
                            "capture a module whose output keeps the token dims")
        raw, x = x, x.detach()
        layout = site.layout
        if layout is None and site.spatial is None and x.dim() > 2 and self._sequence_first(i, x, context):
            layout = (1, 0, *range(2, x.dim()))  # [sequence, batch, ...], read batch-major
        x = as_tokens(x, layout, site.spatial)
        self.dtypes.setdefault(site.name, str(x.dtype).replace("torch.", ""))
        if x.dim() == 2:  # [batch·sequence, D]: the tokens of its forward's grid (see tokens.py)
            x = x.unsqueeze(1)
            tokens = context.flat_tokens(self._sources[i], x.shape[0], x.device)
        elif placements is not None and place is not None and place.kind == "tokens":
            tokens = placements.tokens(context, self._sources[i], x.shape[0], x.shape[1], x.device, place, length)
        else:
            tokens = context.tokens(self._sources[i], x.shape[0], x.shape[1], x.device)
        b, t = x.shape[0], x.shape[1]
        if self._grads is not None and self._phase == "prefill" and raw.dim() > 2:
            self._grads.watch(i, raw, layout, site.spatial, tokens)
        shape = (b * t, x.shape[2:].numel())
        real = self._real.get(i)
        count = tokens.cache.get("real")
        if count is None:
            count = tokens.cache["real"] = tokens.valid.sum()
        self._real[i] = count if real is None else real + count
        held = x.device.type == "cpu" and _stats_base.DENSE_CPU
        size = x.numel() * (max(4, x.element_size()) if held else x.element_size())
        # nobody ends this forward, or holding it passes the budget: fold in now
        now = self._owner is None or self._pending_bytes + size > self._options.cross_budget
        if held and not now:  # a copy in this site's reused buffer; the model's own tensor is not held (see _hold)
            # another site of this forward read the same tensor over the same tokens, and its values are
            # still those copied (q/k/v projections share their input, gate/up theirs): the copy serves
            # both, and the engine computes the chunk once for both (StatEngine._run_sites). The values
            # are compared, not only the version counter, which writes through ``.data`` or a custom
            # kernel leave alone; one read of both costs less than a copy and its statistics. The
            # pending entry keeps ``x`` alive, so no other tensor takes its address before the forward ends.
            key = (x.data_ptr(), tuple(x.shape), x.stride(), x.dtype, _version(x), id(tokens))
            copy = self._staged.get(key)
            if copy is not None and not _same_values(copy, x.reshape(shape)):
                copy = None
            if copy is None:
                copy = self._staged[key] = self._hold(i, x).view(shape)
                self._pending_bytes += size
            self._pending.append((i, name, copy, None, tokens, x))
            return
        x2 = x.reshape(shape)
        if i in self._copy:
            x2 = x2.clone()
        if now:
            with self._interrupt, torch.inference_mode(False), torch.no_grad():
                self._engine.fold(i, name, x2, tokens, self._phase)
            return
        self._pending.append((i, name, x2, _version(x2), tokens, x))
        self._pending_bytes += size

    def _sequence_first(self, i: int, x: Tensor, context: TokenContext) -> bool:
        """Whether site ``i``'s tensor runs sequence-first (``[sequence, batch, ...]``: XLNet's layers,
        ``nn.TransformerEncoder`` without ``batch_first``), told from its call's 2-D mask ``[batch,
        keys]``: the batch is the axis of the mask's size, once the two axes' sizes differ. With
        both equal to the batch size, what an earlier call showed, else the module's ``batch_first``
        says it; refused for a model known to run sequence-first, else read batch-major."""
        inputs = context.calls.get(self._sources[i])
        mask = None if inputs is None else inputs.mask
        if mask is None or mask.dim() != 2:
            return self._seq_first.get(i, False)
        b, m = mask.shape
        first, second = x.shape[0], x.shape[1]
        if first == b and second != b:
            self._seq_first[i] = False
        elif second == b and first != b and first <= m:
            self._seq_first[i] = True
        elif first == second == b and i not in self._seq_first:
            said = _batch_first(self._hooks.modules[i])
            if said is not None:
                return not said
            if getattr(getattr(self._hooks.model, "config", None), "model_type", None) in _SEQUENCE_FIRST:
                raise SiteError(f"the tensor is {tuple(x.shape)}: batch size and sequence length are both {b}, so "
                                "whether this sequence-first model's tensor is [sequence, batch, ...] cannot be "
                                "told; expected a batch whose size differs from its sequence length; pad the "
                                "batch to another length or change its size")
        return self._seq_first.get(i, False)

    def _hold(self, i: int, x: Tensor) -> Tensor:
        """A copy of CPU site ``i``'s tensor ``x`` in a buffer of this capture's, reused across forwards
        (float32 for 16-bit ``x``, the dtype every statistic reads; kept until :meth:`release`).
        Holding the model's own tensors until the forward ends instead keeps them from the allocator
        while the model allocates the rest of the forward around them. A copy also cannot be changed
        in place by the model after the hook."""
        dtype = torch.float32 if x.element_size() < 4 else x.dtype
        buffer = self._held.get(i)
        if buffer is None or buffer.dtype != dtype or buffer.numel() < x.numel():
            with torch.inference_mode(False):  # an ordinary tensor, whatever mode the forward runs in
                buffer = self._held[i] = torch.empty(x.numel(), dtype=dtype)
        return buffer[:x.numel()].view(x.shape).copy_(x)

    def release(self) -> None:
        """Drop the CPU sites' held buffers (the capture exits)."""
        self._held = {}
        if self._grads is not None:  # a backward after the block records nothing
            self._grads.closed = True

    def _unnest(self, i: int, x: Tensor, context: TokenContext) -> Tensor:
        """A NestedTensor (``nn.TransformerEncoder``'s fast path keeps only real tokens): padded back
        to the mask's ``[batch, sequence]`` grid, where padding is left out anyway."""
        inputs = context.calls.get(self._sources[i])
        mask = None if inputs is None else inputs.mask
        if mask is None or mask.dim() != 2 or x.dim() != 3:
            raise SiteError("received a NestedTensor without a [batch, sequence] padding mask to place its "
                            "tokens; expected a dense tensor; build the encoder with enable_nested_tensor=False")
        return torch.nested.to_padded_tensor(x, 0.0, output_size=(mask.shape[0], mask.shape[1], x.size(-1)))

    def report_silent(self, warn: bool = True) -> None:
        """At exit: one warning naming the sites that never fired or saw no real token (the model
        bypasses their modules, e.g. calls ``layer.forward`` directly); recorded as disabled."""
        self.settle()
        self._frame = None
        if self._pending:
            self._drop_pending()
        if not self._recorded:  # no forward, or the schedule skipped every one: nothing to say
            return
        silent = {}
        for i, site in enumerate(self._defs):
            if site.name in self._engine.disabled:
                continue
            if i not in self._fired and self.placements is not None and self.placements.held_earlier(site.name):
                continue  # a later pipeline stage's input: the stage before it records it
            if i not in self._fired:
                silent[site.name] = "never fired"
            elif i in self._real and int(self._real[i]) == 0:
                silent[site.name] = "saw no real token"
        if silent:
            self._engine.disabled.update(silent)
            if not warn:  # the block raised (Ctrl-C): the forward was cut short, not the model's doing
                return
            names = ", ".join(f"{n} ({why})" for n, why in silent.items())
            warnings.warn(f"probe: {len(silent)} of {len(self._defs)} sites recorded nothing: {names}; their "
                          "modules do not run through __call__ in this model's forward, or every token was "
                          "padding; pass sites= naming modules that run", stacklevel=4)

