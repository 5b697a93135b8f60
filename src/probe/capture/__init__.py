"""The write side: hooks on a model, one forward's life, statistics updated on the tensors' own
device, windows committed to a store. Only :func:`capture` and :class:`Capture` are public here;
``probe.capture`` on the top-level package is the function.

The units, in data-flow order: :mod:`.options` (the arguments, validated once), :mod:`.sites`
(which module call is which site), :mod:`.hooks` (the hook set as data), :mod:`.forward` (one
forward's life), :mod:`.tokens` (which tokens of each tensor are real), :mod:`.engine` (the
statistics of a window, a site disabled on error), :mod:`.window` (``every=``, commits, the store),
:mod:`.sync` (rank merges by tensor collectives), :mod:`.session` (the context manager that puts
them together), :mod:`.schedule`, :mod:`.kernels` (fused GPU path).
"""

from .session import Capture, capture

__all__ = ["capture", "Capture"]
