"""Which forwards (or optimizer steps) a capture records: ``capture(schedule=...)``.

A schedule is any callable ``index -> bool`` (``index`` counts from 0), or a
``torch.profiler.schedule(wait=..., warmup=..., active=..., repeat=..., skip_first=...)`` object,
whose ``RECORD`` and ``RECORD_AND_SAVE`` steps are the recorded ones (``NONE`` and ``WARMUP`` are
not). Example: one forward in 25, ``schedule=lambda i: i % 25 == 0``, or
``torch.profiler.schedule(wait=24, warmup=0, active=1)``.
"""

from __future__ import annotations

from typing import Any, Callable

from ..errors import ProbeError

__all__ = ["as_schedule"]


def _recording(value: Any) -> bool | None:
    """``value`` as recorded / not recorded; ``None`` when it is neither a bool nor a ProfilerAction."""
    if isinstance(value, bool):
        return value
    name = getattr(type(value), "__name__", "")
    if name == "ProfilerAction":  # torch.profiler.ProfilerAction (an Enum): RECORD, RECORD_AND_SAVE
        return getattr(value, "name", "").startswith("RECORD")
    return None


def as_schedule(schedule: Any, unit: str = "forward") -> Callable[[int], bool] | None:
    """Validate ``schedule`` and return it as ``index -> bool`` (``None`` records everything).

    Args:
        schedule: ``None``, a callable ``index -> bool``, or a ``torch.profiler.schedule`` object.
        unit: what ``index`` counts (``"forward"`` or ``"optimizer step"``), for the error message.

    Raises:
        ProbeError: ``schedule`` is not callable, or its answer at index 0 is neither a bool nor a
            ``torch.profiler.ProfilerAction`` (checked once, here, so the hooks never raise).
    """
    if schedule is None:
        return None
    fix = (f"pass a callable {unit}_index -> bool such as lambda i: i % 25 == 0, "
           "or torch.profiler.schedule(wait=24, warmup=0, active=1)")
    if not callable(schedule):
        raise ProbeError(f"schedule must be a callable {unit}_index -> bool or a torch.profiler.schedule; "
                         f"got {type(schedule).__name__} {schedule!r}; {fix}")
    try:
        first = schedule(0)
    except Exception as err:
        raise ProbeError(f"schedule must accept a 0-based {unit} index; schedule(0) raised "
                         f"{type(err).__name__}: {err}; {fix}") from err
    if _recording(first) is None:
        raise ProbeError(f"schedule must return a bool or a torch.profiler.ProfilerAction; schedule(0) "
                         f"returned {type(first).__name__} {first!r}; {fix}")

    def recorded(index: int) -> bool:
        return bool(_recording(schedule(index)))

    return recorded
