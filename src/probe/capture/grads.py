"""Activation gradients: the statistics of ``∂loss/∂activation`` at every site, from the backward
of the recorded forwards (``capture(..., grads=True)``).

Recipe (what :class:`probe.capture.forward.Forwards` does with each site's tensor)::

    grads = Grads(engine, [f"{s.name}@grad" for s in sites])
    grads.watch(i, x, site.layout, site.spatial, tokens)   # in the site's hook, on the model's own tensor

At the forward, a tensor hook (``Tensor.register_hook``) is put on the site's own tensor when it
takes part in autograd (``requires_grad`` under grad mode); when the backward computes the
gradient of that tensor, the hook folds it into the site's gradient window key
``"<site>@grad"`` with the forward's tokens (real tokens only; ``skip_first`` applies as for the
activations), through the same statistics and :class:`~probe.capture.engine.StatEngine` as the
activations. The hook holds the forward's token description (a few small index tensors) and
nothing of the activations; it goes away with the tensor, after the backward.

What this gives, and why:

- **Forwards without a backward** (evaluation, ``torch.no_grad``, ``inference_mode``) record no
  gradient: their tensors do not require grad, so no hook is put, and a forward whose graph is
  never backpropagated leaves its hooks uncalled.
- **Gradient accumulation** is exact: each forward's tensors receive their own gradient once,
  in that forward's backward; with ``grads=True`` a window that ``every=`` closes is committed
  when the next forward begins (or at exit), after the backward of its own forwards.
- **Gradient checkpointing** (reentrant or not): the recompute runs inside the backward, where
  probe records nothing (:func:`probe.capture.forward._in_backward`), so no second hook is put
  and no gradient is counted twice; the hook on the first forward's tensor receives the
  gradient. transformers 5.x checkpoints a layer's ``forward``, not its ``__call__``, so the
  decoder layer's output seen by its hook is the checkpoint's output, which requires grad even
  with ``use_reentrant=True``; a site *inside* a reentrant-checkpointed layer (a submodule made
  under ``no_grad`` in the first forward) records no gradient.
- A backward run twice over one graph (``retain_graph=True``) counts the gradient twice; a
  backward after the ``with`` block ended records nothing.
- An error disables the gradient key only, with one warning, never the backward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..stats._base import Tokens
from .engine import StatEngine
from .sites import as_tokens

__all__ = ["Grads", "SUFFIX"]

#: the window key of a site's gradient: ``"<site>@grad"``
SUFFIX = "@grad"


class Grads:
    """Puts the gradient hook on each site's tensor (see the module docstring).

    Args:
        engine: the statistics the gradients are folded into (the capture's own).
        names: the gradient window key of each site, by site index (``""``: none, a
            mixture-of-experts site).
    """

    def __init__(self, engine: StatEngine, names: list[str]) -> None:
        self.engine = engine
        self.names = names
        #: the capture exited: a gradient arriving now (a backward after the block) is not recorded
        self.closed = False

    def watch(self, i: int, x: Tensor, layout: tuple[int, ...] | None, spatial: str | None, tokens: Tokens) -> None:
        """Hook site ``i``'s tensor ``x`` (as the model produced it, before ``layout`` and ``spatial``,
        see :func:`probe.capture.sites.as_tokens`) so that its gradient is folded in with ``tokens``;
        nothing when ``x`` takes no part in autograd."""
        if not (isinstance(x, Tensor) and x.requires_grad and torch.is_grad_enabled()):
            return
        name = self.names[i]
        if not name or name in self.engine.disabled:  # "": a site without a gradient site
            return
        x.register_hook(self._hook(i, name, layout, spatial, tokens))

    def _hook(self, i: int, name: str, layout: tuple[int, ...] | None, spatial: str | None,
              tokens: Tokens) -> Callable[[Tensor], None]:
        engine = self.engine

        def hook(g: Tensor) -> None:
            if not self.closed:
                engine.guarded(name, g, lambda: self._fold(i, name, g, layout, spatial, tokens))

        return hook

    def _fold(self, i: int, name: str, g: Tensor, layout: tuple[int, ...] | None, spatial: str | None,
              tokens: Tokens) -> None:
        with torch.no_grad():
            g = as_tokens(g.detach(), layout, spatial)
            b, t = g.shape[0], g.shape[1]
            self.engine.fold(i, name, g.reshape(b * t, g.shape[2:].numel()), tokens, phase="grad")
            self.engine.flush()  # accelerators gather sites: run them before the tokens' forward is gone
