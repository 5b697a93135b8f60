"""Merging windows across ranks with tensor collectives, from the statistics' declared reductions.

Each rank keeps its own windows, labelled by step. At a point every rank reaches whatever its
batch count (the end of the ``with`` block), :func:`merge_windows` runs:

1. agree on the union of the ranks' steps and on the state's dims (one ``all_gather`` of the step
   labels, one ``all_reduce`` MAX of the dims: a rank that never saw a site still knows its shape);
2. for every step of the union, every rank contributes its window's state, or the identity state
   (:func:`probe.stats._state.empty_state`) where it has none, so no rank waits for another;
3. each field is reduced as declared (:mod:`probe.stats._state`): ``sum``/``min``/``max``/``all``
   with one ``all_reduce`` per (operation, dtype) over all fields packed flat; ``moments`` and
   ``comoments`` exactly in two rounds (sum ``n`` and ``n·mean``, then the central sums shifted to
   the common mean, :func:`probe.stats._state.shift_sums`); ``argmax`` as a MAX of the value then
   MINs of the location among the ranks that hold it; ``bottomk`` by an ``all_gather`` of the
   ``k`` keys (once per set of sites sharing keys: the only gather), after which each rank places
   its winning entries and one SUM assembles the merged sample; ``topk`` by an ``all_gather`` of
   every rank's ``k`` entries (one per dtype for all of them), merged on each rank like files.

No Python object is pickled; the number of collectives does not depend on the number of windows
(windows are packed in batches of at most ``batch_bytes``) and, but for the keys' gather, what
each rank sends does not depend on the number of ranks. Every rank returns the same windows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ..stats._state import SPECS, WindowState, dims_of, empty_state, key_groups, merge_rows, merge_states, shift_sums

__all__ = ["merge_windows", "agree_steps"]

_BIG = torch.iinfo(torch.int64).max
_NONE = torch.iinfo(torch.int64).min
_OPS = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}


class _Round:
    """Tensors to all-reduce together: one collective per (operation, dtype), packed flat."""

    def __init__(self, group) -> None:
        self.group = group
        self.entries: list[tuple[str, torch.Tensor]] = []

    def add(self, op: str, t: torch.Tensor) -> int:
        self.entries.append((op, t))
        return len(self.entries) - 1

    def run(self) -> list[torch.Tensor]:
        out: list[Any] = [None] * len(self.entries)
        buckets: dict[tuple, list[int]] = {}
        for i, (op, t) in enumerate(self.entries):
            buckets.setdefault((op, t.dtype, t.device), []).append(i)
        for (op, _, _), index in sorted(buckets.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
            flat = torch.cat([self.entries[i][1].reshape(-1) for i in index])
            dist.all_reduce(flat, op=_OPS[op], group=self.group)
            start = 0
            for i in index:
                t = self.entries[i][1]
                out[i] = flat[start:start + t.numel()].view(t.shape)
                start += t.numel()
        self.entries = []
        return out


def agree_steps(steps: Sequence[int], device: torch.device, group=None) -> list[int]:
    """The sorted union of every rank's step labels (every rank gets the same list)."""
    world = dist.get_world_size(group)
    count = torch.tensor([len(steps)], dtype=torch.int64, device=device)
    dist.all_reduce(count, op=dist.ReduceOp.MAX, group=group)
    if int(count) == 0:  # no rank committed a window (the same answer on every rank)
        return []
    mine = torch.full((int(count),), _NONE, dtype=torch.int64, device=device)
    if steps:
        mine[:len(steps)] = torch.tensor(list(steps), dtype=torch.int64)
    every = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(every, mine, group=group)
    union = torch.cat(every).cpu().numpy()
    return sorted(int(s) for s in np.unique(union[union != _NONE]))


def _agree_dims(slots: list[tuple[str | None, str]], rows: list[WindowState], device, group) -> dict:
    """Per (site, kind): the sizes of its dims, known from any rank that saw it (MAX)."""
    syms = {kind: sorted({d for f in SPECS[kind].fields for d in f.shape if not d.isdigit()}) for _, kind in slots}
    flat = [(slot, d) for slot in slots for d in syms[slot[1]]]
    mine = torch.zeros(len(flat) + len(slots), dtype=torch.int64, device=device)
    known: dict[tuple, dict] = {}
    for row in rows:
        for slot in slots:
            name, kind = slot
            state = row.cross if name is None else row.state(name, kind)
            if state and slot not in known:
                known[slot] = dims_of(kind, state)
    for i, (slot, d) in enumerate(flat):
        mine[i] = known.get(slot, {}).get(d, 0)
    for j, slot in enumerate(slots):  # does any rank hold this state at all?
        mine[len(flat) + j] = int(slot in known)
    dist.all_reduce(mine, op=dist.ReduceOp.MAX, group=group)
    values = mine.cpu().tolist()
    dims: dict[tuple, dict | None] = {}
    for j, slot in enumerate(slots):
        dims[slot] = {} if values[len(flat) + j] else None
    for i, (slot, d) in enumerate(flat):
        sizes = dims[slot]
        if sizes is not None:
            sizes[d] = values[i]
    return dims


def _by_step(rows: list[WindowState]) -> dict[int, WindowState]:
    """This rank's window per step label (windows sharing a label merged)."""
    out: dict[int, list] = {}
    for r in rows:
        out.setdefault(int(r.step), []).append(r)
    return {s: rs[0] if len(rs) == 1 else merge_rows(rs) for s, rs in out.items()}


def _local(windows: dict[int, WindowState], step: int, slot: tuple) -> dict:
    """This rank's state of ``slot`` at ``step``, or {}."""
    name, kind = slot
    row = windows.get(step)
    if row is None:
        return {}
    return (row.cross if name is None else row.state(name, kind)) or {}


def _reduce(items: list[tuple[tuple, str, dict]], device, group) -> list[dict]:
    """Reduce each item ``(slot, kind, state)`` (a full state on every rank) across ranks."""
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    f64 = torch.float64
    tensors = [{k: torch.from_numpy(np.array(v, copy=True)).to(device) for k, v in state.items()}
               for _, _, state in items]
    results: list[dict[str, torch.Tensor]] = [{} for _ in items]
    first, second = _Round(group), _Round(group)
    plan: list[tuple] = []
    # keys to gather: once per set of sites holding equal keys, when every rank sees the same
    # sets (sites fed by the same forwards); otherwise once per site
    # the items with a bottom-k group, and its key field
    keyed = {i: kf for i, (_, kind, _) in enumerate(items) if (kf := SPECS[kind].bottomk_key) is not None}
    sample_items = list(keyed)
    groups = key_groups([items[i][2][keyed[i]] for i in sample_items])
    if sample_items:
        lo = torch.tensor(groups, dtype=torch.int64, device=device)
        hi = lo.clone()
        dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=group)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=group)
        if not torch.equal(lo, hi):
            groups = list(range(len(sample_items)))
    gathered: dict[int, torch.Tensor] = {}
    gather_for: dict[int, int] = {}
    for j, i in enumerate(sample_items):
        rep = groups[j]
        if rep not in gathered:
            keys = tensors[sample_items[rep]][keyed[sample_items[rep]]].to(f64)
            every = [torch.empty_like(keys) for _ in range(world)]
            dist.all_gather(every, keys, group=group)
            gathered[rep] = torch.stack(every)  # [world, k]
        gather_for[i] = rep
    for i, (_, kind, _) in enumerate(items):
        t = tensors[i]
        for reduce, fields in SPECS[kind].groups():
            names = [f.name for f in fields]
            if reduce in ("sum", "min", "max"):
                plan.append((i, reduce, names, first.add(reduce, t[names[0]])))
            elif reduce == "all":
                plan.append((i, reduce, names, first.add("min", t[names[0]].to(torch.int64))))
            elif reduce == "moments":
                n, mean = t[names[0]].to(f64), t[names[1]].to(f64)
                plan.append((i, reduce, names, first.add("sum", torch.stack((n, n * mean)))))
            elif reduce == "comoments":
                n, mean = t[names[0]].to(f64), t[names[1]].to(f64)
                plan.append((i, reduce, names, first.add("sum", torch.cat((n.reshape(1), n * mean)))))
            elif reduce == "argmax":
                plan.append((i, reduce, names, first.add("max", t[names[0]])))
            elif reduce == "bottomk":
                plan.append((i, reduce, names, None))
    done = first.run()
    later: list[tuple] = []
    for i, reduce, names, slot in plan:
        t = tensors[i]
        if reduce in ("sum", "min", "max"):
            results[i][names[0]] = done[slot]
        elif reduce == "all":
            results[i][names[0]] = done[slot] > 0
        elif reduce == "moments":
            n_all, s1 = done[slot][0], done[slot][1]
            mu = s1 / n_all.clamp(min=1)
            n = t[names[0]].to(f64)
            delta = torch.where(n > 0, t[names[1]].to(f64) - mu, torch.zeros_like(mu))
            sums = shift_sums(n, delta, tuple(t[k].to(f64) for k in names[2:]))
            results[i][names[0]], results[i][names[1]] = n_all, mu
            later.append((i, reduce, names, second.add("sum", torch.stack(sums))))
        elif reduce == "comoments":
            n_all = done[slot][0]
            mu = done[slot][1:] / n_all.clamp(min=1)
            n = t[names[0]].to(f64)
            delta = (t[names[1]].to(f64) - mu) * (n > 0)
            c = t[names[2]].to(f64) + n * torch.outer(delta, delta)
            results[i][names[0]], results[i][names[1]] = n_all.reshape(()), mu
            later.append((i, reduce, names, second.add("sum", c)))
        elif reduce == "argmax":
            vmax = done[slot]
            results[i][names[0]] = vmax
            candidate = t[names[0]] == vmax
            later.append((i, reduce, names, candidate))
        elif reduce == "bottomk":
            keys = gathered[gather_for[i]]  # [world, k]
            k = keys.shape[1]
            # stable order over (rank, slot): equal keys keep rank order, like the file merge
            order = torch.sort(keys.reshape(-1), stable=True).indices[:k]
            own = (order // k) == rank
            take = order % k
            key = keys.reshape(-1)[order]
            empty = torch.isinf(key)
            results[i][names[0]] = key
            parts = []
            for name in names[1:]:
                v = t[name][take]
                v = torch.where(own & ~empty, v, torch.zeros_like(v))
                parts.append((name, second.add("sum", v)))
            later.append((i, reduce, names, (parts, empty)))
    done = second.run()
    argmaxes = []
    for i, reduce, names, slot in later:
        if reduce == "moments":
            for name, value in zip(names[2:], done[slot].unbind(0)):
                results[i][name] = value
        elif reduce == "comoments":
            results[i][names[2]] = done[slot]
        elif reduce == "bottomk":
            parts, empty = slot
            for name, index in parts:
                fill = SPECS[items[i][1]][name].fill
                results[i][name] = torch.where(empty, torch.full_like(done[index], fill), done[index])
        elif reduce == "argmax":
            argmaxes.append((i, names, slot))
    # the location of each argmax: among the ranks holding the largest value, the earliest
    # (row, position, channel); token follows (one MIN round per component)
    alive = [cand for _, _, cand in argmaxes]
    chosen: list[list[torch.Tensor]] = [[] for _ in argmaxes]
    for c in range(4):
        rnd = _Round(group)
        idx = []
        for j, (i, names, _) in enumerate(argmaxes):
            at = tensors[i][names[1]]
            idx.append(rnd.add("min", torch.where(alive[j], at[..., c], torch.full_like(at[..., c], _BIG))))
        got = rnd.run()
        for j, (i, names, _) in enumerate(argmaxes):
            chosen[j].append(got[idx[j]])
            alive[j] = alive[j] & (tensors[i][names[1]][..., c] == got[idx[j]])
    for j, (i, names, _) in enumerate(argmaxes):  # elementwise: one argmax per head for attention
        results[i][names[1]] = torch.stack(chosen[j], -1)
    _gather_topk(items, tensors, results, group)
    out = []
    for (_, kind, _), res in zip(items, results):
        out.append({f.name: res[f.name].to(getattr(torch, f.dtype)).cpu().numpy() for f in SPECS[kind].fields})
    return out


def _gather_topk(items: list, tensors: list[dict], results: list[dict], group) -> None:
    """``topk`` states: every rank gathers every rank's ``k`` entries (one ``all_gather`` per
    dtype for all items) and merges them as the file merge does (:func:`merge_states`)."""
    todo = [(i, [f.name for f in fields]) for i, (_, kind, _) in enumerate(items)
            for reduce, fields in SPECS[kind].groups() if reduce == "topk"]
    if not todo:
        return
    world = dist.get_world_size(group)
    by_dtype: dict[torch.dtype, list[tuple[int, str]]] = {}
    for i, names in todo:
        for name in names:
            by_dtype.setdefault(tensors[i][name].dtype, []).append((i, name))
    gathered: dict[tuple[int, str], list[np.ndarray]] = {}
    for dtype, keys in by_dtype.items():
        flat = torch.cat([tensors[i][name].reshape(-1) for i, name in keys])
        every = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(every, flat, group=group)
        start = 0
        for i, name in keys:
            size = tensors[i][name].numel()
            gathered[(i, name)] = [e[start:start + size].cpu().numpy() for e in every]
            start += size
    for i, names in todo:
        kind = items[i][1]
        parts = [{name: gathered[(i, name)][r] for name in names} for r in range(world)]
        merged = merge_states(kind, parts)
        for name in names:
            results[i][name] = torch.from_numpy(merged[name])


def per_rank(rows: list[WindowState], rank: int, world: int) -> list[WindowState]:
    """``rows`` with every per-rank field (a leading dim ``W``, such as the router's
    ``rank_counts``) widened from this process's one row to ``[world, ...]``, its own at row
    ``rank`` and zeros elsewhere: the rank merge's sum then holds every rank's row."""
    out = []
    for row in rows:
        sites: dict[str, dict[str, Any]] = {}
        for name, states in row.sites.items():
            sites[name] = {}
            for kind, state in states.items():
                fields = [f.name for f in SPECS[kind].fields if f.shape[:1] == ("W",)] if state and kind in SPECS else []
                if fields:
                    state = dict(state)
                    for f in fields:
                        a = np.asarray(state[f])
                        wide = np.zeros((world, *a.shape[1:]), a.dtype)
                        wide[rank] = a.sum(0)
                        state[f] = wide
                sites[name][kind] = state
        out.append(WindowState(row.step, sites, row.cross))
    return out


def merge_windows(rows: list[WindowState], sites: Sequence[str], kinds: Sequence[str], cross: bool,
                  device: torch.device | str = "cpu", group=None, batch_bytes: int = 256 << 20) -> list[WindowState]:
    """Merge every rank's windows (``rows``, each labelled by its ``step``) across the process group.

    Args:
        rows: this rank's committed windows
            with numpy states; steps need not match across ranks (a rank may have fewer).
        sites, kinds: every site name and statistic name of the capture (the same on all ranks).
        cross: whether the cross-layer statistic runs.
        device: where the collectives run (the statistics' device; CPU for gloo).
        batch_bytes: windows are reduced in batches of about this many bytes of state.

    Returns:
        The merged windows in step order, the same on every rank.
    """
    device = torch.device(device)
    rows = per_rank(rows, dist.get_rank(group), dist.get_world_size(group))
    steps = agree_steps([int(r.step) for r in rows], device, group)
    slots: list[tuple] = [(name, kind) for name in sites for kind in kinds if kind != "cross"]
    if cross:
        slots.append((None, "cross"))
    dims = _agree_dims(slots, rows, device, group)
    windows = _by_step(rows)
    live = [s for s in slots if dims[s] is not None]
    merged = [WindowState(s, {name: {k: {} for k in kinds if k != "cross"} for name in sites})
              for s in steps]
    batch: list[tuple] = []
    size = 0

    def flush():
        nonlocal batch, size
        if batch:
            done = _reduce([(slot, slot[1], state) for _, slot, state in batch], device, group)
            for (w, slot, _), state in zip(batch, done):
                name, kind = slot
                if name is None:
                    merged[w].cross = state
                else:
                    merged[w].sites[name][kind] = state
        batch, size = [], 0

    for w, step in enumerate(steps):
        for slot in live:
            state = _local(windows, step, slot) or empty_state(slot[1], dims[slot])
            batch.append((w, slot, state))
            size += sum(np.asarray(v).nbytes for v in state.values())
        if size >= batch_bytes:
            flush()
    flush()
    # a slot that no rank filled in a window stays empty there (as in a single process)
    present = _presence(windows, steps, live, device, group)
    for w in range(len(steps)):
        for j, slot in enumerate(live):
            if not present[w][j]:
                name, kind = slot
                if name is None:
                    merged[w].cross = {}
                else:
                    merged[w].sites[name][kind] = {}
    return merged


def _presence(windows, steps, live, device, group) -> list[list[bool]]:
    mine = torch.zeros(len(steps), max(1, len(live)), dtype=torch.int64, device=device)
    for w, step in enumerate(steps):
        for j, slot in enumerate(live):
            mine[w, j] = int(bool(_local(windows, step, slot)))
    dist.all_reduce(mine, op=dist.ReduceOp.MAX, group=group)
    return mine.bool().cpu().tolist()
