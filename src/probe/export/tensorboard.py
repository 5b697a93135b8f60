"""TensorBoard event files from a run: every window at its step, so the Histograms and
Distributions tabs show each site's activations over training.

Recipe::

    from probe.export.tensorboard import write_tensorboard
    write_tensorboard(probe.load("train.h5"), "runs/probe")   # then: tensorboard --logdir runs

For each window (``run.rows``, labelled by ``run.steps``) and each site with data, under the tag
``<prefix>/<quantity>/<site>``:

- ``values``: a histogram (``SummaryWriter.add_histogram_raw``) whose ``min``, ``max``, ``num``,
  ``sum`` and ``sum_squares`` are exact (from the window's per-channel moments, float64) and whose
  buckets are the float-bit buckets of the histogram statistic: each non-empty bucket's upper
  edge as ``bucket_limit``, a zero-count bucket closing every gap between non-empty ones;
- ``norm``: the same for the per-token L2 norms (when the ``norm`` statistic was captured);
- scalars (stored by TensorBoard as float32): ``std``, ``kurtosis`` (excess), ``absmax``,
  ``nan``, ``posinf``, ``neginf``; with ``norm``: ``norm_mean``, ``anisotropy``; with ``cross``:
  ``block_influence`` (``1 - E[cos]`` from this site to the next, under the earlier site's name);
  at an attention site (``sites="attention"``): ``maxlogit`` (the largest MaxLogit over heads),
  ``attention_entropy`` (the mean over heads of the mean entropy, nats) and ``attention_sink``
  (the mean over heads of the mean probability on the first allowed key).

Needs the ``tensorboard`` package (``pip install "probe[tensorboard]"``); the writer is
``torch.utils.tensorboard.SummaryWriter``.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ProbeError

if TYPE_CHECKING:
    from ..results.run import NormView, SiteView

__all__ = ["write_tensorboard", "log_window", "histogram_args"]


def _writer(logdir: str | os.PathLike):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:  # torch.utils.tensorboard imports the tensorboard package
        raise ProbeError("TensorBoard export needs the tensorboard package; expected it installed; "
                         'pip install "probe[tensorboard]"') from err
    return SummaryWriter(log_dir=os.fspath(logdir))


def histogram_args(counts: np.ndarray, lossless: bool, lo: float, hi: float, num: int, total: float,
                   squares: float) -> dict[str, Any]:
    """Arguments of ``add_histogram_raw`` from float-bit bucket ``counts``.

    ``bucket_limits`` are the upper edges of the non-empty buckets in increasing value order,
    with a zero-count bucket (limit = the next bucket's lower edge) wherever the buckets are not
    contiguous, so TensorBoard's bucket widths are the real ones. ``lo, hi, num, total, squares``
    are the exact min, max, count, sum and sum of squares.
    """
    from ..stats._buckets import Buckets

    c, a, b, _ = Buckets.of(np.shape(counts)[0]).sorted(np.asarray(counts), lossless)
    gap = np.zeros(len(c), dtype=bool)
    gap[1:] = a[1:] > b[:-1]
    limits: list[float] = []
    values: list[float] = []
    for i in range(len(c)):
        if gap[i]:
            limits.append(float(a[i]))
            values.append(0.0)
        limits.append(float(b[i]))
        values.append(float(c[i]))
    return {"min": float(lo), "max": float(hi), "num": int(num), "sum": float(total),
            "sum_squares": float(squares), "bucket_limits": np.asarray(limits, dtype=np.float64),
            "bucket_counts": np.asarray(values, dtype=np.float64)}


def _site_histogram(s: SiteView) -> dict[str, Any] | None:
    if not (s.has("moments") and s.has("histogram")) or s.count == 0:
        return None
    ch = s.channel
    return histogram_args(s.histogram_counts, s.histogram_lossless, s.min, s.max, s.count, float(ch.sum.sum()),
                          float(ch.sum_squares.sum()))


def _norm_histogram(n: NormView) -> dict[str, Any] | None:
    if n.count == 0:
        return None
    return histogram_args(n.counts, False, n.min, n.max, n.count, n.count * n.mean, n.sum_squares)


def log_window(writer, window, step: int, prefix: str = "probe") -> None:
    """Log one window (a :class:`probe.results.run.Run` holding that window alone) at ``step``."""
    for name in window.sites:
        s = window[name]
        hist = _site_histogram(s)
        if hist is not None:
            writer.add_histogram_raw(f"{prefix}/values/{name}", global_step=step, **hist)
        if s.count:
            for key in ("std", "kurtosis", "absmax", "nan", "posinf", "neginf"):
                value = float(getattr(s, key))
                if math.isfinite(value):
                    writer.add_scalar(f"{prefix}/{key}/{name}", value, global_step=step)
        if s.has("norm"):
            nh = _norm_histogram(s.norm)
            if nh is not None:
                writer.add_histogram_raw(f"{prefix}/norm/{name}", global_step=step, **nh)
                for key, value in (("norm_mean", s.norm.mean), ("anisotropy", s.norm.anisotropy)):
                    if math.isfinite(value):
                        writer.add_scalar(f"{prefix}/{key}/{name}", value, global_step=step)
        if s.has("attention") and s.attention.tokens:  # an attention site (sites="attention")
            a = s.attention
            seen = np.isfinite(a.entropy_mean)
            for key, value in (("maxlogit", a.max),
                               ("attention_entropy", float(np.mean(a.entropy_mean[seen])) if seen.any() else math.nan),
                               ("attention_sink", float(np.mean(a.sink_mass[seen, 0])) if seen.any() else math.nan)):
                if math.isfinite(value):
                    writer.add_scalar(f"{prefix}/{key}/{name}", value, global_step=step)
    cross = window.cross
    for name, value in zip(cross.sites, cross.block_influence if "cos" in cross else ()):
        if math.isfinite(value):
            writer.add_scalar(f"{prefix}/block_influence/{name}", float(value), global_step=step)


def write_tensorboard(run, logdir: str | os.PathLike, prefix: str = "probe") -> str:
    """Write every window of ``run`` to a TensorBoard event file in ``logdir``.

    Args:
        run: a :class:`probe.results.run.Run` (``probe.load(path)``, a finished capture, a merge).
        logdir: the folder TensorBoard reads (created if missing; an existing folder gets one
            more event file).
        prefix: the first component of every tag.

    Returns:
        The folder written to.

    Raises:
        ProbeError: the ``tensorboard`` package is missing, or ``run`` is not a run.

    Example:
        >>> write_tensorboard(probe.load("train.h5"), "runs/probe")  # doctest: +SKIP
    """
    from ..results.run import Run

    run = getattr(run, "result", None) or run  # a finished Capture answers with its Run
    if not isinstance(run, Run):
        raise ProbeError(f"run must be a probe Run; got {type(run).__name__}; pass probe.load(path)")
    writer = _writer(logdir)
    try:
        for step, row in zip(run.steps, run.rows):
            log_window(writer, Run(run.meta, [row]), int(step), prefix)
    finally:
        writer.close()
    return os.fspath(logdir)
