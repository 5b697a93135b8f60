"""The hook set: which module call is which site, attached for exactly the length of a capture.

Recipe::

    hooks = HookSet(model, sites)
    hooks.attach(begin, end, enter, leave, observe, open_, close, arrive)   # inside try
    ...
    hooks.remove()                                     # in finally; reverse order

Hooks per capture: the model's pre- and post-hook (``begin``/``end``: one forward), a pre- and
post-hook on each stack that reads its own mask (``enter``/``leave``: an encoder or decoder call;
called alone it is a forward of its own), a counting pre-hook on each module whose sites are the
``n``-th call of it (a shared layer), and one hook per site, which picks the site's tensor out of the
call (:func:`site_tensor`) and hands it to ``observe`` — plus, for a site that follows its call from
inside (``Site.arm``: the down projection's input of fused experts), a pre-hook that starts following
and a post-hook, called also when the call raises, that stops. The site hooks never raise into the
model's forward on their own account: ``observe`` catches and reports.

The model's own hooks do not fire when its ``forward`` is called directly (sentence-transformers
does): then the sites read in the model's own call are one forward from the first of them to the
last (:attr:`HookSet.opening`, :attr:`HookSet.closing`, in the order the forward runs them; for the
sites of ``hidden_states``): a pre-hook on the first one's module opens it (``open``, reading that
call's mask), the last one's hook closes it (``close``). When the order is not known (modules named
in ``sites=``), a pre-hook on every site's module (``arrive``) opens one at the first of them that
runs inside a frame of the model's ``forward``; it ends with that frame. Only the thread that entered the capture
counts calls.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .sites import Site

__all__ = ["Handle", "HookSet", "site_tensor", "token_source"]


@dataclass(frozen=True)
class Handle:
    """One registered hook: which site it serves, where it hangs, and the torch handle."""

    site: str
    module: str
    kind: str
    handle: Any

    def remove(self) -> None:
        self.handle.remove()


def token_source(site: Site) -> str:
    """Which call's token inputs describe ``site``'s tokens: its stack's module, or the model's
    call (``""``), read with the ``decoder_`` prefix for decoder states of an unsplit model."""
    if site.context:
        return site.context
    return "decoder_" if site.stack.startswith("decoder_") else ""


def site_tensor(site: Site, args: tuple, kwargs: dict, output: Any = None) -> Any:
    """The object ``site`` reads from one call (a tensor when the model is as discovered)."""
    if site.pack is not None:  # built from the whole call (probe.capture.moe); never raises
        return site.pack(args, kwargs, output)
    if site.read == "input":
        if isinstance(site.index, str):
            return kwargs.get(site.index)
        i = site.index or 0
        if len(args) > i:
            return args[i]
        return kwargs.get("hidden_states") if i == 0 else None
    if site.read == "last_hidden_state":
        x = getattr(output, "last_hidden_state", None)
        if x is None and isinstance(output, (tuple, list)) and output:
            x = output[0]
        return x
    if isinstance(output, Tensor):
        return output
    if isinstance(site.index, str):
        try:
            return output[site.index]
        except (KeyError, TypeError, IndexError):
            return getattr(output, site.index, None)
    if isinstance(output, (tuple, list)):
        i = site.index or 0
        return output[i] if len(output) > i else None
    # a ModelOutput or other mapping: its first tensor, as transformers' to_tuple() would
    return next((v for v in getattr(output, "values", lambda: [])() if isinstance(v, Tensor)), None)


class HookSet:
    """The hooks of one capture, and the per-forward state that selects the ``n``-th call."""

    def __init__(self, model: nn.Module, sites: list[Site]) -> None:
        modules = dict(model.named_modules())
        self.model = model
        self.sites = sites
        self.modules = [modules[s.module] for s in sites]
        self.contexts = {s.context: modules[s.context] for s in sites if s.context}
        self.handles: list[Handle] = []
        #: stack contexts running now (innermost last); ``""`` is the model's own forward
        self.active: list[str] = []
        self._counts: dict[tuple[str, int], int] = {}
        #: the current forward is one the schedule skips: every site hook returns at once
        self.off = False
        #: the thread whose calls are counted (the one that attached the hooks)
        self.thread = threading.get_ident()
        self.opening, self.closing = _ends(sites)
        self._close: Callable[[], None] | None = None

    @property
    def opener(self) -> nn.Module | None:
        """The module whose call opens a forward of the model called past its hooks (see the module docstring)."""
        return None if self.opening is None else self.modules[self.opening]

    # ------------------------------------------------------------------ per-forward state
    def reset(self, context: str) -> None:
        """A call of ``context`` begins: its modules' call counters restart."""
        for key in [k for k in self._counts if k[0] == context]:
            del self._counts[key]

    def _current(self, site: Site, module: nn.Module) -> bool:
        """Whether this call of ``module`` is ``site``'s call."""
        if site.call is None:
            return True
        if site.context and site.context not in self.active:
            return False
        return self._counts.get((site.context, id(module)), 0) - 1 == site.call

    # ------------------------------------------------------------------------- attaching
    def attach(self, begin: Callable, end: Callable, enter: Callable, leave: Callable,
               observe: Callable[[int, Any], None], open_: Callable | None = None,
               close: Callable[[], None] | None = None, arrive: Callable | None = None) -> None:
        """Register every hook (call inside ``try``; :meth:`remove` in ``finally``)."""
        root = self.model
        add = self.handles.append
        self.thread = threading.get_ident()
        self._close = close
        # prepended in reverse: the model's pre-hook runs first, then a stack's, then the counters
        counted: dict[int, set[str]] = {}
        for site, module in zip(self.sites, self.modules):
            if site.call is not None:
                counted.setdefault(id(module), set()).add(site.context)
        for site, module in zip(self.sites, self.modules):
            if id(module) in counted:
                add(Handle("<count>", site.module, "pre-count", module.register_forward_pre_hook(
                    self._counter(sorted(counted.pop(id(module)))), prepend=True)))
        opener = self.opener
        if opener is not None and open_ is not None and close is not None:
            add(Handle("<forward>", self.sites[self.opening or 0].module, "pre-open",
                       opener.register_forward_pre_hook(open_, with_kwargs=True, prepend=True)))
        elif arrive is not None:  # the sites' order is unknown: each site's module may open a forward
            seen: set[int] = set()
            for site, module in zip(self.sites, self.modules):
                if site.module and id(module) not in seen:
                    seen.add(id(module))
                    add(Handle("<forward>", site.module, "pre-arrive",
                               module.register_forward_pre_hook(arrive, with_kwargs=True, prepend=True)))
        for name, module in self.contexts.items():
            add(Handle("<stack>", name, "pre-stack", module.register_forward_pre_hook(
                self._stack_pre(name, enter), with_kwargs=True, prepend=True)))
        add(Handle("<forward>", "", "pre-root", root.register_forward_pre_hook(begin, with_kwargs=True, prepend=True)))
        for i, (site, module) in enumerate(zip(self.sites, self.modules)):
            if site.read == "input":
                h = module.register_forward_pre_hook(self._pre(i, observe), with_kwargs=True)
                kind = "pre"
            else:
                h = module.register_forward_hook(self._post(i, observe))
                kind = "post"
            add(Handle(site.name, site.module, kind, h))
        for i, (site, module) in enumerate(zip(self.sites, self.modules)):
            if site.arm is not None and site.disarm is not None:
                add(Handle(site.name, site.module, "pre-arm", module.register_forward_pre_hook(
                    self._arm(i), with_kwargs=True)))
                # after the site's own post-hook (which reads what was followed); also when the call raises
                add(Handle(site.name, site.module, "post-disarm", module.register_forward_hook(
                    lambda module, args, output, d=site.disarm: d(), always_call=True)))
        for name, module in self.contexts.items():
            add(Handle("<stack>", name, "post-stack", module.register_forward_hook(
                self._stack_post(name, leave), always_call=True)))
        # always_call: also when the forward raises (then ``output`` is None), so that a forward
        # that stopped half-way is known at once and none of it is kept
        add(Handle("<forward>", "", "post-root", root.register_forward_hook(end, always_call=True)))

    def remove(self) -> None:
        """Remove every hook, last registered first."""
        while self.handles:
            self.handles.pop().remove()
        self.active.clear()
        self.off = False
        self._counts.clear()

    # ---------------------------------------------------------------------- hook factories
    def _counter(self, contexts: list[str]):
        counts = self._counts
        ident = threading.get_ident
        compiling = torch.compiler.is_compiling

        def hook(module, args):
            # another thread's forward is ignored (see forward.py); a compiled graph keeps the count
            # (the thread is not traceable, and would break the graph at every counted module)
            if not compiling() and ident() != self.thread:
                return
            for c in contexts:
                key = (c, id(module))
                counts[key] = counts.get(key, 0) + 1

        return hook

    def _stack_pre(self, name: str, enter: Callable):
        def hook(module, args, kwargs):
            enter(name, module, args, kwargs)

        return hook

    def _stack_post(self, name: str, leave: Callable):
        def hook(module, args, output):
            leave(name, output)

        return hook

    def _arm(self, i: int):
        site = self.sites[i]
        arm = site.arm
        ident = threading.get_ident
        compiling = torch.compiler.is_compiling

        def hook(module, args, kwargs):
            if self.off or compiling() or ident() != self.thread or arm is None:
                return
            if self._current(site, module):
                arm(module, args, kwargs)

        return hook

    def _pre(self, i: int, observe: Callable):
        site = self.sites[i]
        close = self._close if i == self.closing else None
        if close is not None:
            def last(module, args, kwargs):
                if self._current(site, module):
                    if not self.off:
                        observe(i, site_tensor(site, args, kwargs))
                    close()

            return last

        def hook(module, args, kwargs):
            if self.off:  # a forward the schedule skips: touch nothing
                return
            if self._current(site, module):
                observe(i, site_tensor(site, args, kwargs))

        return hook

    def _post(self, i: int, observe: Callable):
        site = self.sites[i]
        close = self._close if i == self.closing else None
        if close is not None:
            def last(module, args, output):
                if self._current(site, module):
                    if not self.off:
                        observe(i, site_tensor(site, args, {}, output))
                    close()

            return last

        def hook(module, args, output):
            if self.off:
                return
            if self._current(site, module):
                observe(i, site_tensor(site, args, {}, output))

        return hook


def _ends(sites: list[Site]) -> tuple[int | None, int | None]:
    """The first and the last site read in the model's own call by a module inside it, in the order
    a forward runs them (the hidden states' order), when every such site is one ``hidden_states``
    found; ``(None, None)`` otherwise: the order of modules named by the user is not known, and a
    module of theirs called on its own stays a forward of its own."""
    own = [i for i, s in enumerate(sites) if s.module and token_source(s) == ""]
    if not own or any(sites[i].source == "module" for i in own):
        return None, None
    # a module around the first site's (BERT's encoder, whose output is the last state) is entered
    # before it: the forward opens there, before any of its calls is counted
    first = sites[own[0]].module
    around = [i for i in own if first.startswith(sites[i].module + ".")]
    return min(around, key=lambda i: len(sites[i].module), default=own[0]), own[-1]
