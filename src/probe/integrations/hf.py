"""A Hugging Face ``Trainer`` callback: capture during ``train()``, one window per ``every`` steps."""

from __future__ import annotations

import os
from typing import Any

from transformers import TrainerCallback

from .._schedule import as_schedule
from ..capture import Capture, capture
from ..errors import ProbeError

__all__ = ["ProbeCallback"]


class ProbeCallback(TrainerCallback):
    """Capture activation statistics while a ``Trainer`` trains.

    The capture opens at ``on_train_begin`` on the model being trained and closes at
    ``on_train_end``; every ``every`` optimizer steps (``state.global_step``) the current window is
    committed with that step as its label, so ``probe.load(out).at(step)`` is one stretch of
    training and ``probe.load(out)[site]`` the whole run. Forward passes of evaluation inside
    training are captured too. Under ``torch.distributed`` the windows are merged across ranks
    and rank 0 writes the file.

    With ``schedule``, only the forwards of the scheduled optimizer steps are recorded (every
    forward of such a step, gradient-accumulation micro-batches and evaluation included); the
    others cost one flag check per hook.

    Args:
        out: the HDF5 file to write.
        every: commit a window every this many optimizer steps.
        schedule: which optimizer steps to record: a callable ``step_index -> bool`` (0-based:
            the step about to run, i.e. ``state.global_step`` at its start) or a
            ``torch.profiler.schedule(...)``; ``None`` records every step.
        **options: any other :func:`probe.capture` argument (``sites``, ``stats``, ``skip_first``, ...).

    Example:
        >>> cb = ProbeCallback(out="train.h5", every=100, skip_first=1)  # doctest: +SKIP
        >>> Trainer(model, args, train_dataset=ds, callbacks=[cb]).train()  # doctest: +SKIP
    """

    def __init__(self, out: str | os.PathLike, every: int = 100, schedule: Any = None, **options: Any) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ProbeError(f"every must be an int >= 1 (optimizer steps); got {every!r}; pass e.g. every=100")
        if "every" in options:
            raise ProbeError("pass every= to ProbeCallback only (it counts optimizer steps); remove it from options")
        self.out, self.every, self.options = out, every, options
        self.schedule = as_schedule(schedule, unit="optimizer step")
        self.capture: Capture | None = None
        self._recording = True

    def _forward_recorded(self, forward_index: int) -> bool:
        return self._recording

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise ProbeError("ProbeCallback got no model from the Trainer; expected Trainer(model=...); "
                             "pass the model to the Trainer")
        if self.schedule is not None:
            self._recording = self.schedule(state.global_step)
        schedule = None if self.schedule is None else self._forward_recorded
        self.capture = capture(model, self.out, schedule=schedule, **self.options)
        self.capture.__enter__()

    def on_step_begin(self, args, state, control, **kwargs):
        if self.schedule is not None:
            self._recording = self.schedule(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if self.capture is not None and state.global_step % self.every == 0:
            self.capture.snapshot(step=state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        if self.capture is not None:
            c, self.capture = self.capture, None
            if state.global_step % self.every:  # the steps after the last window
                c.snapshot(step=state.global_step)
            c.__exit__(None, None, None)
            self.result = c.result
