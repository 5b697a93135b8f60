"""A Hugging Face ``Trainer`` callback: capture during ``train()``, one window per ``every`` steps."""

from __future__ import annotations

import functools
import os
import sys
from types import FrameType
from typing import Any

from transformers import TrainerCallback

from ..capture.options import CaptureOptions, check_int
from ..capture.schedule import as_schedule
from ..capture.session import Capture, capture
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

    If ``train()`` raises, the capture is closed as a ``with`` block would be on an exception: its
    hooks leave the model and what was recorded is saved. (The ``Trainer`` has no event for an
    exception, so the callback wraps that trainer's ``train`` when the trainer is built with it; a
    callback added later with ``add_callback`` closes a capture left open at the next
    ``on_train_begin`` instead.)

    With ``schedule``, only the forwards of the scheduled optimizer steps are recorded (every
    forward of such a step, gradient-accumulation micro-batches and evaluation included); the
    others cost one flag check per hook.

    Args:
        out: the HDF5 file to write.
        every: commit a window every this many optimizer steps.
        schedule: which optimizer steps to record: a callable ``step_index -> bool`` (0-based:
            the step about to run, i.e. ``state.global_step`` at its start) or a
            ``torch.profiler.schedule(...)``; ``None`` records every step.
        tensorboard: also log each window to TensorBoard as it is committed
            (:func:`probe.export.tensorboard.log_window`: histograms and scalars at the window's
            step): ``True`` logs to ``$TENSORBOARD_LOGGING_DIR`` if set, else to
            ``<output_dir>/runs/probe`` (beside the Trainer's own runs); a path logs there.
            ``None`` (default): ``True`` when the Trainer reports to TensorBoard
            (``"tensorboard"`` in ``args.report_to``).
            Under ``torch.distributed`` the windows are merged at the end of training, so they
            are logged then (rank 0).
        **options: any other :func:`probe.capture` argument (``sites``, ``stats``, ``skip_first``, ...).

    Raises:
        ProbeError: ``every`` is not an int >= 1 or is among ``options``, a bad ``schedule``, or
            an option :func:`probe.capture` refuses: checked here, with the same messages, not
            when training begins (``distributed=`` and the model are checked then).

    Example:
        >>> cb = ProbeCallback(out="train.h5", every=100, skip_first=1)  # doctest: +SKIP
        >>> Trainer(model, args, train_dataset=ds, callbacks=[cb]).train()  # doctest: +SKIP
    """

    def __init__(self, out: str | os.PathLike, every: int = 100, schedule: Any = None,
                 tensorboard: bool | str | os.PathLike | None = None, **options: Any) -> None:
        check_int("every", every, 1, "pass e.g. every=100", unit=" (optimizer steps)")
        if "every" in options:
            raise ProbeError("pass every= to ProbeCallback only (it counts optimizer steps); remove it from options")
        self.out, self.every, self.options = out, every, options
        self.schedule = as_schedule(schedule, unit="optimizer step")
        # the checks capture() runs at on_train_begin, now (the process group may come later)
        CaptureOptions.create(out, **{**options, "distributed": False})
        self.capture: Capture | None = None
        self.tensorboard = tensorboard
        self._tb = None  # the SummaryWriter, while training
        self._recording = True

    def _forward_recorded(self, forward_index: int) -> bool:
        return self._recording

    def on_init_end(self, args, state, control, **kwargs):
        trainer = _trainer_of(self)
        if trainer is not None and not getattr(trainer.train, "_probe_guard", False):
            train = trainer.train

            @functools.wraps(train)
            def guarded(*a: Any, **kw: Any) -> Any:
                try:
                    return train(*a, **kw)
                except BaseException as err:
                    for cb in trainer.callback_handler.callbacks:
                        if isinstance(cb, ProbeCallback):
                            cb._abandon(err)
                    raise

            guarded._probe_guard = True  # type: ignore[attr-defined]
            trainer.train = guarded

    def _abandon(self, err: BaseException | None) -> None:
        """Close a capture that training left open (it raised): hooks removed, the window saved."""
        if self.capture is None:
            return
        c, self.capture = self.capture, None
        try:
            c.__exit__(None if err is None else type(err), err, None if err is None else err.__traceback__)
            self.result = c.result
        finally:
            if self._tb is not None:
                self._tb.close()
                self._tb = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._abandon(None)  # a previous train() raised past an unwrapped trainer
        if model is None:
            raise ProbeError("ProbeCallback got no model from the Trainer; expected Trainer(model=...); "
                             "pass the model to the Trainer")
        if self.schedule is not None:
            self._recording = self.schedule(state.global_step)
        schedule = None if self.schedule is None else self._forward_recorded
        self.capture = capture(model, self.out, schedule=schedule, **self.options)
        self.capture.__enter__()
        wanted = self.tensorboard
        if wanted is None:
            wanted = "tensorboard" in (getattr(args, "report_to", None) or [])
        if wanted and self.capture.options.rank == 0:
            from ..export.tensorboard import _writer

            logdir = wanted if not isinstance(wanted, bool) else (
                os.getenv("TENSORBOARD_LOGGING_DIR") or os.path.join(args.output_dir, "runs", "probe"))
            self._tb = _writer(logdir)

    def _log(self, step: int, c: Capture | None) -> None:
        if self._tb is not None and c is not None and c.options.world == 1:
            from .. import load
            from ..export.tensorboard import log_window

            log_window(self._tb, load(self.out).at(step), step)
            self._tb.flush()

    def on_step_begin(self, args, state, control, **kwargs):
        if self.schedule is not None:
            self._recording = self.schedule(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if self.capture is not None and state.global_step % self.every == 0:
            self.capture.snapshot(step=state.global_step)
            self._log(state.global_step, self.capture)

    def on_train_end(self, args, state, control, **kwargs):
        if self.capture is not None:
            c, self.capture = self.capture, None
            if state.global_step % self.every:  # the steps after the last window
                c.snapshot(step=state.global_step)
                self._log(state.global_step, c)
            c.__exit__(None, None, None)
            self.result = c.result
            if self._tb is not None:
                if c.options.world > 1:  # merged only now
                    from ..export.tensorboard import log_window
                    from ..results.run import Run

                    for step, row in zip(c.result.steps, c.result.rows):
                        log_window(self._tb, Run(c.result.meta, [row]), int(step))
                self._tb.close()
                self._tb = None


def _trainer_of(callback: ProbeCallback) -> Any:
    """The ``Trainer`` whose callback handler is calling ``callback`` now (found on the call stack:
    the callback events carry no reference to it), or ``None``."""
    frame: FrameType | None = sys._getframe(1)
    for _ in range(12):
        if frame is None:
            return None
        owner = frame.f_locals.get("self")
        handler = getattr(owner, "callback_handler", None)
        if callback in getattr(handler, "callbacks", ()) and callable(getattr(owner, "train", None)):
            return owner
        frame = frame.f_back
    return None
