"""The windows of one capture: their labels, when one is committed, and where it goes.

Recipe (what :class:`probe.capture.session.Capture` does)::

    recorder = Recorder(options, engine, names, describe=lambda: capture.meta)
    recorder.open()                 # the writer, on rank 0 with out=
    ...                             # forwards: count_forward() / forward_ended() (every=)
    recorder.snapshot(step)         # run.snapshot(step)
    recorder.commit(final=True)     # exit: the last window, the rank merge, the result

A window is committed as a :class:`~probe.stats._state.WindowState` labelled by a step (the
number of forwards unless given). Alone, rank 0 appends it to ``out`` at once (:mod:`probe.store`).
probe's I/O never fails the host's job: a window the store refuses (disk full, a read-only or
deleted file) stays in memory with one warning naming the cause and the path, is retried at the
next commit, and at exit what the file still lacks goes to a recovery file, named in a warning
(``strict=True`` raises :class:`probe.store.StoreError` instead);
under ``torch.distributed`` every rank keeps its windows and at exit all ranks merge them window by
window (:func:`probe.capture.sync.merge_windows`), at a point every rank reaches whatever its
number of batches. The result is then read back from the store (:func:`probe.store.read`) or
built in memory (:func:`probe.store.in_memory`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch

from .. import stats as _stats
from .. import store
from ..errors import ProbeError
from ..stats._state import WindowState
from .engine import StatEngine
from .options import CaptureOptions
from .parallel import Placements

__all__ = ["Recorder"]


class Recorder:
    """Labels, ``every=``, commits and the result of one capture.

    Args:
        options: the capture's options (``out``, ``overwrite``, ``every``, ``rank``, ``world``,
            ``seed``, ``stats``, ``skip_first``).
        engine: the statistics whose windows are committed.
        names: every site name, in capture order.
        describe: the run's description (``Capture.meta``), read at each write.
    """

    def __init__(self, options: CaptureOptions, engine: StatEngine, names: list[str],
                 describe: Callable[[], dict[str, Any]], placements: Placements | None = None) -> None:
        self.options = options
        self.engine = engine
        self.names = names
        self._description = describe
        #: each site's placement across ranks (:mod:`probe.capture.parallel`), agreed at exit
        self.placements = placements
        #: the sample seed the description records: rank 0's once the ranks merged
        self.seed = options.seed
        #: forwards of the model so far, the ones the schedule skips included
        self.forwards = 0
        #: labels of the committed windows
        self.steps: list[int] = []
        #: committed windows kept in memory (no ``out``, or ranks that merge at exit)
        self.rows: list[WindowState] = []
        self.writer: store.Writer | None = None
        #: the :class:`probe.results.run.Run` once the capture exited
        self.result: Any = None
        self._committed = 0
        #: committed windows the file has not taken yet (a failed write), in order
        self.pending: list[WindowState] = []
        #: where the windows went when ``out`` could not take them all (``None``: all in ``out``)
        self.recovered: str | None = None
        self._warned = False
        #: grads=True: the label of a window every= closed, committed when the next forward begins
        #: (after the backward of its own forwards) or at exit
        self._due: int | None = None
        #: a pipeline stage: (real tokens its sites saw, -1 if none; whether a forward lacked input_ids),
        #: read at exit (set by the capture)
        self.stage_inputs: Callable[[], tuple[int, bool]] = lambda: (-1, False)
        #: a pipeline stage, after the merge: the whole model's site descriptions (``meta`` keys)
        self._stage_meta: dict[str, Any] = {}

    def _describe(self) -> dict[str, Any]:
        """The run's description, with the parallel layout it was captured under (``meta["parallel"]``:
        the world size and, once the ranks agreed at exit, each site's placement and group size)."""
        meta = self._description()
        meta.update(self._stage_meta)
        if self.options.world > 1 and "parallel" not in meta:
            placed = self.placements.describe() if self.placements is not None else {}
            meta["parallel"] = {"world_size": self.options.world, **placed}
        return meta

    # ------------------------------------------------------------------------------ store
    def open(self) -> None:
        """Open the writer (rank 0, with ``out``)."""
        if self.options.out is not None and self.options.rank == 0:
            self.writer = store.Writer(self.options.out, self.options.overwrite)

    def abort(self) -> None:
        """Close the writer of a capture that failed to start."""
        if self.writer is not None:
            self.writer.abort()

    def _store(self, rows: list[WindowState], wait: bool = True) -> bool:
        """Append ``rows`` after the pending ones; whether the file took them all. A failure keeps
        them pending with one warning (``strict``: raises), so the host's forward goes on.

        ``wait=False`` (the commits of ``every=`` and schedules) hands the last window to probe's
        writer process and returns: it stays pending until the writer acknowledges it, at the next
        commit or at exit, so the forward does not wait for HDF5 and the disk."""
        self.pending.extend(rows)
        writer = self.writer
        assert writer is not None
        while True:
            try:
                acknowledged = writer.in_flight  # the window in flight, if any, is pending[0]
                writer.settle()
                if acknowledged:
                    self.pending.pop(0)
                if not self.pending:
                    return True
                last = len(self.pending) == 1
                writer.append(self._describe(), self.pending[0], wait=wait or not last)
                if not writer.in_flight:
                    self.pending.pop(0)  # written and acknowledged already
                elif last:
                    return True
            except store.StoreError as err:
                if self.options.strict:
                    raise
                if not self._warned:
                    self._warned = True
                    warnings.warn(f"probe: window step={self.pending[0].step} was not written: {err}; probe keeps "
                                  "it and retries at each commit, and at exit writes what the file lacks to a "
                                  f"recovery file beside {writer.path!r} or in the temp folder "
                                  "(strict=True raises instead)", stacklevel=4)
                return False

    def _rescue(self) -> None:
        """At exit: the windows ``out`` never took go to a recovery file (one warning names it)."""
        writer = self.writer
        assert writer is not None
        try:
            path, what = writer.rescue(self._describe(), self.pending)
        except store.StoreError as err:
            if self.options.strict:
                raise
            warnings.warn(f"probe: {err}", stacklevel=4)
            return
        self.recovered = path
        warnings.warn(f"probe: {len(self.pending)} window(s) could not be written to {writer.path!r}; they are in "
                      f"{path!r}, which holds {what}; read it with probe.load({path!r})", stacklevel=4)
        self.pending = []

    # ---------------------------------------------------------------------------- forwards
    def count_forward(self) -> int:
        """A forward of the model begins (recorded or skipped by the schedule); its number."""
        if self._due is not None:
            self.commit(step=self._due, wait=False)
        self.forwards += 1
        return self.forwards

    def forward_ended(self) -> None:
        """A forward ended: with ``every=k``, commit a window after every ``k``-th."""
        every = self.options.every
        if every is not None and self.forwards % every == 0:
            if self.options.grads:  # the backward of this window's forwards is still to come
                self._due = self.forwards
            else:
                self.commit(wait=False)
        elif self.writer is not None and self.writer.in_flight and self.writer.answered():
            self._store([], wait=False)  # acknowledged already: reading the answer costs nothing

    # ---------------------------------------------------------------------------- windows
    def snapshot(self, step: int | None = None) -> None:
        """Commit the current window (see :meth:`probe.capture.session.Capture.snapshot`)."""
        if step is not None and (isinstance(step, bool) or not hasattr(step, "__index__")):
            raise ProbeError(f"snapshot(step=...) must be an int; got {step!r}; pass e.g. the optimizer step")
        label = self.forwards if step is None else int(step)
        if label in self.steps:
            self.engine.flush()
            self.engine.finish_cross()
            if step is None and self.engine.empty:
                return
            raise ProbeError(f"snapshot(step={label}): a window with step {label} was committed already; expected "
                             f"a new label (committed: {self.steps[-5:]}); pass another step, or none to commit "
                             "under the number of forwards")
        self.commit(step=label)

    def commit(self, step: int | None = None, final: bool = False, wait: bool = True) -> None:
        """Commit the current window under ``step`` (default: the number of forwards) and start a
        new one; ``final``: the capture exits, so also merge the ranks and build the result;
        ``wait=False``: return before the writer process acknowledges the window (``_store``).

        Raises:
            StoreError: with ``strict=True`` only, the file refused the window (it stays pending).
        """
        if not final:
            self._commit(step, final, wait or self.options.strict)
            return
        try:
            self._commit(step, final, True)
        finally:
            if self.writer is not None:
                try:
                    self.writer.close()  # the file is free for other writers, whatever happened
                except store.StoreError as err:  # a window in flight failed, and exit came first
                    warnings.warn(f"probe: window step={self.pending[0].step if self.pending else '?'} was not "
                                  f"written: {err}", stacklevel=3)

    def _commit(self, step: int | None, final: bool, wait: bool) -> None:
        self._due = None
        self.engine.flush()
        self.engine.finish_cross()
        world = self.options.world
        if final and self.engine.empty and (self._committed or world > 1):
            self._finish()  # nothing since the last window (a rank with no forward adds none)
            return
        label = self.forwards if step is None else int(step)
        if final and label in self.steps:  # an explicit label took this number: never lose the window
            label = max(self.steps) + 1
        row = self.engine.window_state(label)
        self.steps.append(label)
        self.engine.new_window()
        self._committed += 1
        if world > 1 or self.writer is None:  # ranks merge their windows at exit
            self.rows.append(row)
        else:
            self._store([row], wait)  # the window is the store's now, written or pending (strict: raises)
        if final:
            self._finish()

    # ------------------------------------------------------------------------------- exit
    def _sync(self) -> list[WindowState]:
        """Merge every rank's windows (see :mod:`probe.capture.sync`): called at exit, which every rank
        reaches whatever its number of batches."""
        import torch.distributed as dist

        from . import sync

        device = torch.device("cpu")
        if dist.get_backend() == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        # one description on every rank: rank 0's seed, the cross-layer members any rank fixed
        seed = torch.tensor([self.seed if self.options.rank == 0 else 0], dtype=torch.int64, device=device)
        dist.all_reduce(seed)
        self.seed = int(seed)
        cross = self.engine.cross
        staged = self.placements is not None and self.placements.stage is not None
        if cross is not None and not staged:
            members = torch.zeros(len(cross.candidates), dtype=torch.int64, device=device)
            members[list(cross.members or [])] = 1
            dist.all_reduce(members, op=dist.ReduceOp.MAX)
            cross.members = [i for i, m in enumerate(members.tolist()) if m]
        stats = self.options.stats
        rows = self.rows
        if self.placements is not None:  # each rank's part of the global tensors, disjoint
            rows = self.placements.localize(rows, device)
            mixed = self.placements.mixed(cross.sites) if cross is not None else None
            if mixed:  # the same on every rank (the placements were agreed)
                warnings.warn(f"probe: the cross-layer sites have different placements across ranks ({mixed}), so "
                              "their tokens do not pair up; the cross-layer statistic is left out of this run; "
                              "capture sites of one placement with it (docs/distributed.md)", stacklevel=5)
                rows = [WindowState(r.step, r.sites, {}) for r in rows]
        names = self.names
        if self.placements is not None and staged:  # every stage's sites under the whole model's names
            real, no_ids = self.stage_inputs()
            rows, self._stage_meta = self.placements.stages(rows, self._description(), real, no_ids, device,
                                                            self.engine.relay)
            names = [s["name"] for s in self._stage_meta["sites"]]
            if self.engine.relay is not None:  # the stages agreed on their tokens: every message has its receiver
                self.engine.relay.close()
        own = [k for k in _stats.SITE_ONLY if any(k in (s.stats or ()) for s in self.engine.sites)]
        return sync.merge_windows(rows, names, [k for k in stats if k not in ("cross", "cos")]
                                  + [k for k in own if k not in stats], "cross" in stats, device)

    def _finish(self) -> None:
        if self.options.world > 1:
            self.rows = self._sync()
        writer = self.writer
        if writer is None:
            self.result = store.in_memory(self._describe(), self.rows)
            return
        try:
            if not self._store(self.rows if self.options.world > 1 else []):
                self._rescue()
        finally:
            writer.close()
        try:
            self.result = store.read(self.recovered or writer.path)
        except ProbeError as err:  # the file went away: answer from what is still in memory
            if self.options.strict:
                raise
            warnings.warn(f"probe: the run could not be read back ({err}); the result holds the "
                          f"{len(self.pending)} window(s) kept in memory", stacklevel=4)
            self.result = store.in_memory(self._describe(), self.pending)

    def warn_all_skipped(self) -> None:
        """One warning when ``skip_first`` removed every real token of a site that saw some."""
        skip = self.options.skip_first
        result = self.result
        if not skip or "moments" not in self.options.stats or result is None:
            return
        disabled = self.engine.disabled
        empty = [n for n in result.sites if n not in disabled and result[n].tokens == 0]
        if empty:
            warnings.warn(f"probe: skip_first={skip} left no token at {len(empty)} site(s) "
                          f"({', '.join(empty[:4])}{' …' if len(empty) > 4 else ''}): every real token sat at a "
                          f"position below {skip}, so their statistics are empty (NaN); pass a smaller "
                          "skip_first, or longer sequences", stacklevel=3)
