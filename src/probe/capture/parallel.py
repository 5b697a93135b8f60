"""Which part of the global tensor each rank holds, so that every global element counts once.

Recipe (tensor parallel, a colwise/rowwise plan over the mesh ``tp``)::

    from probe.capture.parallel import Layout

    parallelize_module(model, tp, plan)
    with probe.capture(model, sites="hidden_states", parallel=Layout(tp, {"hidden_states.*": "replicate"})):
        model(**batch)

A site's placement is one of

- ``"data"``: this rank's own rows (data parallel, FSDP2, a pipeline stage's layers): merged across
  ranks as they are, which is what probe does without a layout;
- ``"replicate"``: every rank of the group holds the same tensor (the residual stream under tensor
  parallelism): only the group's first rank (index 0) counts it; the others skip it at the hook;
- ``"tokens"``: the group's ranks hold consecutive chunks of the sequence (dim 1, ``torch.chunk``
  sizes, as ``Shard(1)`` lays them out: sequence parallelism): each rank's tokens, with their
  absolute positions and mask sliced the same way, merge like data-parallel rows;
- ``"features"``: the ranks hold consecutive chunks of the channels (the last dim: a row-parallel
  linear layer's input, ``Shard(-1)``): at exit each rank's per-channel statistics are placed at
  their channel offset in the global width, its channel indices (``absmax_at``, top-k, sample)
  shifted by it, and its token counts kept on the group's first rank only, so one merge over all
  ranks gives the whole-site statistics exactly (moments by the parallel formulas, histograms by
  addition, extremes by min/max, top-k and the sample from the union with global channels).

Where the placement comes from, per site and first match first: a DTensor's own ``placements`` and
``device_mesh`` (a linear layer's input inside a TP plan, which torch's pre-hook turns into a
DTensor before probe's hook runs); else the :class:`Layout` given as ``capture(parallel=...)``
(globs over site names, or the module path, then its ``default``); else ``"data"`` when the model
holds no tensor-parallel module. A plain tensor in a model that holds one (a module with
``parallelize_module``'s hooks), matched by no layout, is refused with one line: its placement
cannot be known. ``Partial`` placements (unreduced partial sums) are refused too. The per-token
statistics that need a token's whole feature vector (``"norm"``, ``"cos"``) are refused at a
``"features"`` site.
"""

from __future__ import annotations

import fnmatch
import json
import math
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import ProbeError, SiteError
from ..stats._base import Tokens
from ..stats._state import SPECS, WindowState

__all__ = ["Layout", "Placement", "Placements", "PlacementKind", "check_layout"]

PlacementKind = Literal["data", "replicate", "tokens", "features"]
KINDS: tuple[PlacementKind, ...] = ("data", "replicate", "tokens", "features")
_CODE = {k: i + 1 for i, k in enumerate(KINDS)}  # 0: this rank never saw the site
#: the fields that count tokens, not elements: under "features" every rank of the group counts the
#: same tokens, so only the group's first rank keeps them
_TOKEN_COUNTS = {("moments", "tokens"), ("position", "tokens"), ("position", "overflow")}
#: statistics that read a token's whole feature vector
_WHOLE_TOKEN = ("norm", "cos")


@dataclass(frozen=True)
class Layout:
    """How this rank's plain (non-DTensor) site tensors relate to the global ones.

    Args:
        group: the process group the placements are over (the tensor/sequence-parallel group): a
            ``torch.distributed.ProcessGroup``, a 1-D ``DeviceMesh`` (e.g. ``mesh["tp"]``), or
            ``None`` for the whole world.
        sites: glob over site names (``"hidden_states.*"``) or module paths (``"model.layers.*"``)
            → placement (``"data"``, ``"replicate"``, ``"tokens"``, ``"features"``); the first
            matching glob wins.
        default: the placement of a plain site no glob matches; ``None`` (default): such a site
            follows the model (``"data"`` without tensor-parallel modules, refused with them).
        verify: every rank accumulates a checksum of each replicated site's tensor (its element
            count, Σ|x| and Σx² in float64, the k-th forward's weighted by k, on the tensor's device,
            no host sync; two reductions per site and forward), and at exit one ``all_gather`` compares them within each replica
            group: one warning names the sites whose replicas differ by more than 1e-6 relative
            (they were not the same tensor, so counting one of them misrepresents the others).
        pipeline, pipeline_group: see :meth:`pipeline_stage`.

    Raises:
        ProbeError: from :func:`check_layout` (``capture(parallel=...)``) for a placement outside
            the four, a glob that is not a string, or a group of the wrong type.
    """

    group: Any = None
    sites: Mapping[str, PlacementKind] = field(default_factory=dict)
    default: PlacementKind | None = None
    #: this rank holds one pipeline stage (its own layers) of the stages over ``pipeline_group``
    #: (see :meth:`pipeline_stage`)
    pipeline: bool = False
    #: the pipeline's group (``ProcessGroup``, 1-D ``DeviceMesh`` or ``None``: the whole world); the
    #: stage index is this rank's index in it
    pipeline_group: Any = None
    #: check that the replicas of every ``"replicate"`` site are equal across their group (see
    #: :meth:`Placements.localize`): one warning naming the sites whose replicas differ
    verify: bool = False

    @classmethod
    def pipeline_stage(cls, group: Any = None, tensor: Layout | None = None) -> Layout:
        """The layout of a pipeline stage: this rank runs some consecutive decoder layers of the model
        (stage ``i`` = this rank's index in ``group``), as its own module (an HF model built with its
        stage's layers, numbered from 0, its ``num_hidden_layers`` their count), called with
        ``input_ids`` on the first stage and ``inputs_embeds`` (the activations received) plus the
        ``attention_mask`` on the later ones.

        At exit every stage's sites are renamed to the whole model's (``hidden_states.j`` → ``j`` plus
        the layers of the stages before it; a path ``<layers>.j...`` likewise), the ranks agree on
        the union of the site descriptions (one ``all_gather`` of uint8-encoded JSON, no pickling), a
        site two stages hold (a later stage's ``hidden_states.0``, its predecessor's last) counts
        from the earlier one, and the file has every site once, in model order. Sites are data
        within a stage (pipeline × data parallel merges the stage's replicas as rows).

        Args:
            group: the pipeline group (``ProcessGroup``, 1-D ``DeviceMesh`` such as ``mesh["pp"]``,
                or ``None``: the whole world, one rank per stage).
            tensor: a tensor-parallel layout inside each stage (its group and site globs), or ``None``.

        Raises:
            ProbeError: at exit, when the stages counted different numbers of real tokens (they must
                run the same batches).
        """
        base = tensor if tensor is not None else cls()
        return cls(base.group, dict(base.sites), base.default, pipeline=True, pipeline_group=group,
                   verify=base.verify)

    @classmethod
    def from_plan(cls, group: Any, plan: Mapping[str, Any], verify: bool = False) -> Layout:
        """The layout of the residual stream for a ``parallelize_module`` plan: ``"tokens"`` when
        the plan holds a ``SequenceParallel`` style (sequence parallelism: the stream between the
        blocks is ``Shard(1)``), else ``"replicate"``; linear inputs carry their own DTensor
        placement. ``group``: the mesh or group the plan was applied over."""
        from torch.distributed.tensor.parallel import SequenceParallel

        sp = any(isinstance(style, SequenceParallel) for style in plan.values())
        return cls(group, {"hidden_states.*": "tokens" if sp else "replicate",
                           "*hidden_states.*": "tokens" if sp else "replicate"}, verify=verify)

    def kind_of(self, name: str, module: str) -> PlacementKind | None:
        """The placement a plain tensor of site ``name`` (of ``module``) has, or ``None``."""
        for pattern, kind in self.sites.items():
            if fnmatch.fnmatchcase(name, pattern) or (module and fnmatch.fnmatchcase(module, pattern)):
                return kind
        return self.default


def check_layout(value: Any) -> Layout | None:
    """``capture(parallel=...)`` checked: a :class:`Layout`, a mapping ``glob -> placement`` (over
    the whole world), or ``None``.

    Raises:
        ProbeError: anything else, an unknown placement, or a group of the wrong type.
    """
    if value is None:
        return None
    if isinstance(value, Mapping) and not isinstance(value, Layout):
        value = Layout(None, dict(value))
    if not isinstance(value, Layout):
        raise ProbeError(f"parallel must be a probe.capture.parallel.Layout, a dict glob -> placement or None; got "
                         f"{type(value).__name__}; pass e.g. Layout(mesh['tp'], {{'hidden_states.*': 'replicate'}})")
    for pattern, kind in list(value.sites.items()) + [("default", value.default)]:
        if not isinstance(pattern, str):
            raise ProbeError(f"parallel: site globs must be strings; got {pattern!r}; pass e.g. 'hidden_states.*'")
        if kind not in KINDS and not (pattern == "default" and kind is None):
            raise ProbeError(f"parallel: placement of {pattern!r} must be one of {list(KINDS)}; got {kind!r}; "
                             "pass 'replicate' (every rank holds it), 'tokens' (split along the sequence) or "
                             "'features' (split along channels)")
    _group_of(value.group)
    _group_of(value.pipeline_group)
    return value


def _group_of(group: Any) -> Any:
    """A process group from a ``ProcessGroup``, 1-D ``DeviceMesh`` or ``None`` (the world)."""
    if group is None:
        return None
    from torch.distributed import ProcessGroup
    from torch.distributed.device_mesh import DeviceMesh

    if isinstance(group, DeviceMesh):
        if group.ndim != 1:
            raise ProbeError(f"parallel: the layout's mesh must be 1-D; got a {group.ndim}-D mesh "
                             f"{group.mesh_dim_names}; pass the tensor-parallel dim, e.g. mesh['tp']")
        return group.get_group()
    if isinstance(group, ProcessGroup):
        return group
    raise ProbeError(f"parallel: group must be a ProcessGroup, a 1-D DeviceMesh or None; got "
                     f"{type(group).__name__}; pass e.g. mesh['tp']")


@dataclass
class Placement:
    """One site's placement on this rank: ``kind``, this rank's ``index`` in the group of
    ``size`` ranks whose first global rank is ``leader``, and whether it ``counts`` at all
    (``False``: a replica past the group's first, or a rank past index 0 of a replicated mesh dim)."""

    kind: PlacementKind
    index: int = 0
    size: int = 1
    leader: int = 0
    counts: bool = True


def _tp_modules(model: nn.Module) -> bool:
    """Whether ``model`` holds a module that ``parallelize_module`` (``distribute_module``) hooked."""
    for module in model.modules():
        for hooks in (module._forward_pre_hooks, module._forward_hooks):
            for hook in hooks.values():
                if "distribute_module" in getattr(hook, "__qualname__", ""):
                    return True
    return False


def _member(group: Any) -> tuple[int, int, int]:
    """(this rank's index in ``group``, its size, its first global rank)."""
    import torch.distributed as dist

    ranks = dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size()))
    return ranks.index(dist.get_rank()), len(ranks), min(ranks)


class Placements:
    """The placements of one capture's sites, found as the sites first arrive (see the module
    docstring), used at the hook (:meth:`local`, :meth:`tokens`) and at exit (:meth:`localize`).

    Args:
        model: the captured model (whether it holds tensor-parallel modules).
        layout: ``capture(parallel=...)``, checked.
        names, modules: each site's name and module path, in site order.
        stats: the statistics recorded.
        distributed: whether the capture merges ranks (a layout means nothing otherwise).
    """

    def __init__(self, model: nn.Module, layout: Layout | None, names: list[str], modules: list[str],
                 stats: tuple[str, ...], distributed: bool) -> None:
        self.layout = layout
        self.names = names
        self.modules = modules
        self.stats = stats
        self.on = distributed
        self._dtensor: Any = ()  # the DTensor class under torch.distributed (isinstance of () is False)
        if distributed:
            from torch.distributed.tensor import DTensor

            self._dtensor = DTensor
        self.tp = distributed and _tp_modules(model)
        self.sites: dict[int, Placement] = {}
        self._group = _group_of(layout.group) if (layout is not None and distributed) else None
        #: per site, after :meth:`localize`: (placement, group size) agreed over every rank
        self.agreed: dict[str, tuple[str, int]] = {}
        #: ``Layout(verify=True)``: per replicated site, this rank's checksum of its replicas
        self.checksums: dict[int, Tensor] = {}
        self._calls: dict[int, int] = {}
        self._width = len(names)  # the sites' count the collectives of localize are padded to
        #: the replicated sites whose replicas differed (after :meth:`localize`)
        self.differ: list[str] = []
        #: a pipeline stage: its decoder layers' count and their container's path
        self.stage: tuple[int, str] | None = None
        #: after :meth:`stages`: what the file records of the pipeline (``meta["parallel"]["pipeline"]``)
        self.pipeline: dict[str, Any] = {}
        if layout is not None and layout.pipeline and distributed:
            self.stage = _stage_layers(model)

    # ------------------------------------------------------------------------------ hooks
    def local(self, i: int, x: Tensor) -> tuple[Tensor, Placement | None]:
        """This rank's part of site ``i``'s tensor ``x`` (a DTensor's local tensor) and its placement
        (``None``: plain data, nothing to do).

        Raises:
            SiteError: a ``Partial`` placement, a shard along another dim than tokens (1) or features
                (last), a plain tensor in a tensor-parallel model that no layout describes, or
                ``"norm"``/``"cos"`` at a features site.
        """
        found: Placement | None
        if isinstance(x, self._dtensor):
            found = self.sites.get(i) or self._from_dtensor(x)  # a site's placement is found once
            x = x.to_local()
        else:
            if not self.on:
                return x, None
            found = self.sites.get(i)
            if found is None:
                found = self._described(i)
        if found is not None:
            self.sites.setdefault(i, found)
            if found.kind == "replicate" and self.layout is not None and self.layout.verify:
                self._checksum(i, x)
            if found.kind == "features":
                whole = [s for s in _WHOLE_TOKEN if s in self.stats]
                if whole:
                    raise SiteError(f"{whole} read each token's whole feature vector, which this rank holds a "
                                    f"1/{found.size} slice of (the site is sharded along features); pass stats "
                                    "without them for this capture")
        return x, found

    def _checksum(self, i: int, x: Tensor) -> None:
        """Fold replica ``x`` of site ``i`` into its checksum (count, Σ|x|, Σx², float64, on device),
        the ``k``-th call's weighted by ``k`` (the same batches in another order differ too)."""
        x = x.detach()
        self._calls[i] = k = self._calls.get(i, 0) + 1
        part = torch.stack((torch.tensor(float(x.numel()), dtype=torch.float64, device=x.device),
                            x.abs().sum(dtype=torch.float64), x.double().square().sum())) * k
        known = self.checksums.get(i)
        self.checksums[i] = part if known is None else known + part

    def _described(self, i: int) -> Placement | None:
        name, module = self.names[i], self.modules[i]
        kind = self.layout.kind_of(name, module) if self.layout is not None else None
        if kind is None:
            if self.tp:
                raise SiteError("the tensor is a plain tensor inside a tensor-parallel model, so which part of the "
                                "global tensor this rank holds cannot be known; pass capture(parallel=Layout(mesh, "
                                f"{{{name!r}: 'replicate' | 'tokens' | 'features'}})) (see docs/distributed.md)")
            return Placement("data")  # each rank's own rows (data parallel, FSDP2)
        if kind == "data":
            return Placement("data")
        index, size, leader = _member(self._group)
        return Placement(kind, index, size, leader, counts=kind != "replicate" or index == 0)

    def _from_dtensor(self, x: Any) -> Placement:
        from torch.distributed.tensor import Partial, Replicate, Shard

        mesh = x.device_mesh
        counts, found = True, Placement("replicate")
        sharded = None
        for dim, p in enumerate(x.placements):
            coordinate = mesh.get_local_rank(dim)
            if isinstance(p, Replicate):
                counts = counts and coordinate == 0
            elif isinstance(p, Shard):
                d = p.dim % x.dim()
                kind: PlacementKind | None = "data" if d == 0 else "tokens" if d == 1 else (
                    "features" if d == x.dim() - 1 else None)
                if kind is None:
                    raise SiteError(f"the DTensor is sharded along dim {p.dim} of {tuple(x.shape)}; expected the "
                                    "batch (0), sequence (1) or feature (last) dim; capture another module")
                if kind != "data":
                    if sharded is not None:
                        raise SiteError(f"the DTensor is sharded along tokens or features on two mesh dims "
                                        f"({x.placements}); expected one; capture another module")
                    index, size, leader = _member(mesh.get_group(dim))
                    sharded = Placement(kind, index, size, leader)
            elif isinstance(p, Partial):
                raise SiteError(f"the DTensor holds partial sums (placements {x.placements}), not the tensor; "
                                "capture the module whose output is reduced (e.g. the block, not the linear layer)")
            else:
                raise SiteError(f"unknown DTensor placement {p!r}; expected Replicate or Shard")
        if sharded is not None:
            found = sharded
        elif all(isinstance(p, Shard) for p in x.placements):
            found = Placement("data")
        else:
            index, size, leader = _member(mesh.get_group(next(d for d, p in enumerate(x.placements)
                                                              if isinstance(p, Replicate))))
            found = Placement("replicate", index, size, leader)
        found.counts = counts
        return found

    def global_length(self, inputs: Any) -> int:
        """The global sequence length of a token-sharded tensor: the call's ``input_ids``,
        ``inputs_embeds`` or 2-D mask length."""
        for t in (getattr(inputs, "input_ids", None), getattr(inputs, "mask", None)):
            if isinstance(t, Tensor) and t.dim() == 2:
                return int(t.shape[1])
        raise SiteError("a token-sharded site needs the call's input_ids or a 2-D attention_mask to know the "
                        "global sequence length; pass input_ids or attention_mask")

    def tokens(self, context: Any, stack: str, b: int, t: int, device: torch.device, place: Placement,
               length: int | None = None) -> Tokens:
        """The tokens of this rank's chunk ``[b, t]`` of a ``[b, length]`` token-sharded tensor
        (``torch.chunk`` sizes: chunk ``index`` starts at ``index * ceil(length / size)``; ``length``
        ``None``: the call's, see :meth:`global_length`).

        Raises:
            SiteError: ``t`` is not the length of this rank's chunk, or the call extends a KV cache.
        """
        inputs = context.calls.get(stack) or context.calls.get("")
        if inputs is not None and inputs.past is not None:
            raise SiteError("a token-sharded site extends a KV cache; expected a forward over whole sequences; "
                            "capture without sequence parallelism for generation")
        if length is None:
            length = self.global_length(inputs)
        chunk = math.ceil(length / place.size)
        start = place.index * chunk
        if t != max(0, min(chunk, length - start)):
            raise SiteError(f"rank {place.index} of {place.size} holds {t} of {length} tokens, not the torch.chunk "
                            f"share {max(0, min(chunk, length - start))}; expected Shard(1) layout; "
                            "describe the site as 'replicate' or 'features' if it is not split along the sequence")
        memo = (stack, b, length, device, "chunk", start, t)
        found = context._memo.get(memo)
        if found is not None:
            return found
        whole = context.tokens(stack, b, length, device)

        def cut(v: Tensor) -> Tensor:
            return v.reshape(b, length)[:, start:start + t].reshape(-1)

        found = Tokens(cut(whole.valid), cut(whole.keep), cut(whole.position), cut(whole.row), cut(whole.token),
                       whole.forward, whole.seed, 0, whole.head_bound, {})
        context._memo[memo] = found
        return found

    # ------------------------------------------------------------------------------- exit
    def localize(self, rows: list[WindowState], device: torch.device) -> list[WindowState]:
        """Every rank's windows made disjoint parts of the global ones (see the module docstring),
        with one ``all_gather`` of each rank's placements and widths (every rank calls it).

        Raises:
            ProbeError: ranks disagree on a site's placement.
        """
        import torch.distributed as dist

        n = width = len(self.names)
        stage = 0
        if self.stage is not None:  # pipeline stages hold different sites: each is compared within its stage
            assert self.layout is not None
            stage = _member(_group_of(self.layout.pipeline_group))[0]
            most = torch.tensor([n], dtype=torch.int64, device=device)
            dist.all_reduce(most, op=dist.ReduceOp.MAX)
            width = int(most)
        mine = torch.zeros(max(width, 1), 6, dtype=torch.int64, device=device)
        widths = self._widths(rows)
        for i, place in self.sites.items():
            mine[i] = torch.tensor([_CODE[place.kind], place.index, place.size, place.leader, widths.get(i, 0), stage])
        every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(every, mine)
        table = torch.stack(every).cpu().numpy()[:, :n]  # [world, sites, 6]
        if self.stage is not None:  # another stage's site i is another site: leave it out
            table[table[:, :, 5] != stage] = 0
        self.agreed = {}
        for i, name in enumerate(self.names):
            codes = set(table[:, i, 0].tolist()) - {0}
            if len(codes) > 1:
                raise ProbeError(f"site {name!r}: the ranks found different placements "
                                 f"{sorted(KINDS[c - 1] for c in codes)}; expected one; pass "
                                 "capture(parallel=...) describing it the same way on every rank")
            if codes:
                self.agreed[name] = (KINDS[codes.pop() - 1], int(table[:, i, 2].max()))
        if self.layout is not None and self.layout.verify:
            self._width = width
            self._verify(table, device)
        out = []
        for row in rows:
            sites = dict(row.sites)
            for i, place in self.sites.items():
                same = table[:, i, 3] == place.leader
                offset = int(table[same & (table[:, i, 1] < place.index), i, 4].sum())
                total = int(table[same, i, 4].sum())
                for name in (self.names[i], self.names[i] + "@decode"):
                    if name not in sites:
                        continue
                    if place.kind == "features":
                        sites[name] = {kind: _widen(kind, st, offset, total, place.index == 0)
                                       for kind, st in sites[name].items()}
                    elif not place.counts:
                        sites[name] = {kind: {} for kind in sites[name]}
            out.append(WindowState(row.step, sites, row.cross))
        return out

    def _verify(self, table: np.ndarray, device: torch.device) -> None:
        """Compare the replicas' checksums within each group (one ``all_gather``; every rank calls it
        when the layout asks to verify); one warning names the sites whose replicas differ."""
        import torch.distributed as dist

        n = table.shape[1]
        mine = torch.zeros(max(self._width, 1), 3, dtype=torch.float64, device=device)
        for i, c in self.checksums.items():
            mine[i] = c.to(device)
        every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(every, mine)
        sums = torch.stack(every).cpu().numpy()[:, :n]  # [world, sites, 3]
        replicate = _CODE["replicate"]
        self.differ = []
        for i, name in enumerate(self.names):
            held = table[:, i, 0] == replicate
            for leader in sorted(set(table[held, i, 3].tolist())):
                group = sums[held & (table[:, i, 3] == leader), i]  # [replicas, 3]
                spread = group.max(0) - group.min(0)
                if np.any(spread > 1e-6 * np.abs(group).max(0)):
                    self.differ.append(name)
                    break
        if self.differ:
            shown = ", ".join(self.differ[:4]) + (" …" if len(self.differ) > 4 else "")
            warnings.warn(f"probe: the replicas of {len(self.differ)} replicated site(s) differ across their group "
                          f"({shown}): expected every rank of the group to hold the same tensor, but their "
                          "checksums (count, sum |x|, sum x^2) differ by more than 1e-6 relative; only the group's "
                          "first rank was counted; describe these sites as 'tokens', 'features' or 'data' "
                          "(docs/distributed.md)", stacklevel=6)

    def _widths(self, rows: list[WindowState]) -> dict[int, int]:
        out = {}
        for i, place in self.sites.items():
            if place.kind != "features":
                continue
            for row in rows:
                for kind, st in list(row.sites.get(self.names[i], {}).items()) + list(
                        row.sites.get(self.names[i] + "@decode", {}).items()):
                    for f in SPECS[kind].fields if kind in SPECS else ():
                        if "D" in f.shape and f.name in st:
                            out[i] = int(np.asarray(st[f.name]).shape[f.shape.index("D")])
        return out

    def mixed(self, names: list[str]) -> list[str] | None:
        """The placements of ``names`` (agreed by :meth:`localize`) when they are not all one, else ``None``."""
        kinds = sorted({self.agreed.get(name.split("@")[0], ("data", 1))[0] for name in names})
        return kinds if len(kinds) > 1 else None

    def describe(self) -> dict[str, Any]:
        """The layout the file records (``meta["parallel"]``): per site its placement and group size,
        and for a pipeline the stages (``"pipeline"``: ``stages``, ``layers`` and ``first_layer`` per
        stage)."""
        agreed = self.pipeline.get("agreed", self.agreed)  # a pipeline: every stage's sites, renamed
        out: dict[str, Any] = {"placements": {name: kind for name, (kind, _) in agreed.items()},
                               "group_sizes": {name: size for name, (_, size) in agreed.items()}}
        if self.pipeline:
            out["pipeline"] = {k: v for k, v in self.pipeline.items() if k not in ("rename", "agreed")}
        return out

    # --------------------------------------------------------------------------- pipeline
    def relay(self, device: torch.device) -> Relay | None:
        """A pipeline stage's :class:`Relay` for the cross-layer statistic, or ``None`` (one stage,
        or no pipeline). Every rank calls it at capture entry: one ``all_gather`` of the pipeline
        groups' ranks over the world, then one ``new_group`` per pipeline, in one order everywhere."""
        import torch.distributed as dist

        if self.stage is None or self.layout is None:
            return None
        group = _group_of(self.layout.pipeline_group)
        world = dist.get_world_size()
        ranks = dist.get_process_group_ranks(group) if group is not None else list(range(world))
        if len(ranks) < 2:
            return None
        mine = torch.full((world,), -1, dtype=torch.int64, device=device)
        mine[:len(ranks)] = torch.tensor(ranks, dtype=torch.int64)
        every = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(every, mine)
        pipelines = tuple(sorted({tuple(r for r in t.tolist() if r >= 0) for t in every}))
        if pipelines not in _RELAY_GROUPS:  # the same on every rank: every rank makes them, or none
            _RELAY_GROUPS[pipelines] = [dist.new_group(list(members)) for members in pipelines]
        own = _RELAY_GROUPS[pipelines][pipelines.index(tuple(ranks))]
        index = ranks.index(dist.get_rank())
        drop = self.names.index("hidden_states.0") if index > 0 and "hidden_states.0" in self.names else None
        return Relay(own, ranks, index, drop)

    def held_earlier(self, name: str) -> bool:
        """Whether site ``name`` of this pipeline stage is the previous stage's last one (a later
        stage's ``hidden_states.0``: the activations it received), which that stage records."""
        if self.stage is None or name != "hidden_states.0":
            return False
        assert self.layout is not None
        return _member(_group_of(self.layout.pipeline_group))[0] > 0

    def stages(self, rows: list[WindowState], meta: dict[str, Any], real: int, no_ids: bool,
               device: torch.device, relay: Relay | None = None) -> tuple[list[WindowState], dict[str, Any]]:
        """A pipeline stage's windows under the whole model's site names, and the union of every
        stage's site descriptions (``meta["sites"]``, ``meta["disabled"]``) in model order (see
        :meth:`Layout.pipeline_stage`). Every rank calls it: one ``all_gather`` of each stage's
        layer count, real tokens and whether it lacked ``input_ids`` over the pipeline group, two
        collectives for the descriptions over the world.

        Args:
            rows: this rank's windows (localized).
            meta: this rank's run description (``Capture.meta``).
            real: the real tokens this stage's sites saw (``-1``: no site fired).
            no_ids: a forward of this stage had no ``input_ids`` (its token ids are ``-1``).

        Returns:
            The windows renamed, a site held by an earlier stage emptied here; the descriptions'
            patch (``sites``, ``disabled``, ``cross_sites``).

        Raises:
            ProbeError: the stages counted different numbers of real tokens.
        """
        import torch.distributed as dist

        assert self.layout is not None and self.stage is not None
        group = _group_of(self.layout.pipeline_group)
        index, size, _ = _member(group)
        layers, container = self.stage
        mine = torch.tensor([layers, real, int(no_ids)], dtype=torch.int64, device=device)
        every = [torch.empty_like(mine) for _ in range(size)]
        dist.all_gather(every, mine, group=group)
        table = torch.stack(every).cpu().tolist()  # [stage, 3]
        counted = sorted({r[1] for r in table if r[1] >= 0})
        if len(counted) > 1:
            raise ProbeError(f"pipeline stages counted {[r[1] for r in table]} real tokens (stage by stage); "
                             "expected the same tokens at every stage; run every stage over the same batches "
                             "with the same attention_mask")
        offset = sum(r[0] for r in table[:index])
        rename = {}
        for name in self.names:
            shifted = _shift(name, offset, container)
            for suffix in ("", "@decode", "@grad"):
                rename[name + suffix] = shifted + suffix
        sites = []
        for info in meta["sites"]:
            info = dict(info)
            info["name"] = _shift_suffixed(info["name"], offset, container)
            info["module"] = _shift(info["module"], offset, container) if info.get("module") else info.get("module")
            if info.get("stack") == "hidden_states" and isinstance(info.get("hf_index"), int):
                info["hf_index"] += offset
            sites.append(info)
        disabled = {_shift_suffixed(k, offset, container): v for k, v in meta.get("disabled", {}).items()}
        # every rank's descriptions, uint8-encoded JSON (no pickling)
        agreed = {_shift(name, offset, container): list(v) for name, v in self.agreed.items()}
        cross = [_shift(name, offset, container) for name in meta.get("cross_sites", [])]
        blob = json.dumps({"stage": index, "sites": sites, "disabled": disabled, "agreed": agreed,
                           "cross": cross}).encode()
        length = torch.tensor([len(blob)], dtype=torch.int64, device=device)
        dist.all_reduce(length, op=dist.ReduceOp.MAX)
        padded = torch.zeros(int(length), dtype=torch.uint8, device=device)
        padded[:len(blob)] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
        gathered = [torch.empty_like(padded) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, padded)
        parts = [json.loads(bytes(g.cpu().numpy().tobytes()).rstrip(b"\0").decode()) for g in gathered]
        holder: dict[str, tuple[int, int, dict]] = {}  # global name -> (stage, its order there, description)
        union_disabled: dict[str, str] = {}
        union_agreed: dict[str, list] = {}
        for part in parts:
            for name, v in part["agreed"].items():
                union_agreed.setdefault(name, v)
            for order, info in enumerate(part["sites"]):
                key = (part["stage"], order)
                if info["name"] not in holder or key < holder[info["name"]][:2]:
                    holder[info["name"]] = (*key, info)
            union_disabled.update(part["disabled"])
        ordered = sorted(holder.values(), key=lambda h: (h[0], h[1]))
        by_stage = {part["stage"]: part["cross"] for part in reversed(parts)}  # each stage's first rank's
        cross_sites = [name for stage in sorted(by_stage) for name in by_stage[stage]] if relay is not None else []
        out = []
        for row in rows:
            renamed = {}
            for name, states in row.sites.items():
                new = _shift_suffixed(name, offset, container)
                renamed[new] = states if holder.get(new, (index,))[0] == index else {k: {} for k in states}
            # a pipeline's cross-layer statistic is the last stage's, over every stage's sites (Relay)
            kept = size == 1 or (relay is not None and relay.last)
            out.append(WindowState(row.step, renamed, row.cross if kept else {}))
        lacking = [i for i, r in enumerate(table) if r[2]]
        if lacking:
            warnings.warn(f"probe: pipeline stage(s) {lacking} ran without input_ids (the activations they "
                          "received), so the token ids at their sites are recorded as -1 (top-k, absmax_at); "
                          "the statistics are not affected", stacklevel=6)
        self.pipeline = {"stages": size, "stage_layers": [r[0] for r in table],
                         "first_layer": [sum(r[0] for r in table[:i]) for i in range(size)],
                         "sites_by_stage": {h[2]["name"]: h[0] for h in ordered}, "rename": rename,
                         "agreed": union_agreed}
        model = dict(meta.get("model") or {})  # the whole model's layer count, not this stage's
        if isinstance(model.get("config"), dict) and "num_hidden_layers" in model["config"]:
            model["config"] = {**model["config"], "num_hidden_layers": sum(r[0] for r in table)}
        return out, {"sites": [h[2] for h in ordered], "disabled": union_disabled, "model": model,
                     "cross_sites": meta.get("cross_sites", []) if size == 1 else cross_sites}


#: the relay groups made so far, per set of pipelines (later captures over the same ranks reuse them)
_RELAY_GROUPS: dict[tuple, list] = {}


class Relay:
    """The cross-layer statistic across pipeline stages. Its co-moments pair each token's values at
    every two sites, which stages hold apart: at the end of every forward a stage receives the
    earlier stages' held sites of that forward from its predecessor, and passes them on with its
    own (``[K, n, D]``, in float32, exact for float32, bfloat16 and float16 activations; float64
    stays float64) to its successor; the last stage folds all of them, its matrices in model order.
    A stage whose sites of a forward are not whole (over ``cross_budget``, modified in place, not
    fired) passes on ``K = 0``, and the last stage counts the forward's tokens as skipped. The
    messages go over a process group of the pipeline's ranks made for this (at capture entry, by
    every rank: :meth:`Placements.relay`), never the group the model's own activations travel on.

    Cost: each stage sends, per recorded forward, every earlier stage's sites with its own (the
    sites' size times the stages before the last, at most ``cross_budget`` bytes a forward)."""

    def __init__(self, group: Any, ranks: list[int], index: int, drop: int | None) -> None:
        self.group = group
        self.ranks = ranks
        self.index = index
        self.last = index == len(ranks) - 1
        #: the local site that repeats the previous stage's last (a later stage's ``hidden_states.0``)
        self.drop = drop
        self._sent: list[tuple[Any, Tensor, Tensor]] = []  # (work, header, data) until delivered

    def pass_on(self, xs: list[Tensor] | None, tokens: Any, budget: int) -> list[Tensor] | None:
        """This stage's sites of a forward (``None``: not whole) -> on the last stage, every stage's
        (``None``: some stage's were not whole); elsewhere ``None``, after sending them on."""
        import torch.distributed as dist

        n = int(tokens.keep.shape[0])
        device = tokens.keep.device
        upstream: list[Tensor] | None = []
        if self.index > 0:
            head = torch.zeros(4, dtype=torch.int64, device=device)
            dist.recv(head, src=self.ranks[self.index - 1], group=self.group)
            k, rows, width, wide = head.tolist()
            upstream = None
            if k > 0:
                data = torch.empty(k, rows, width, dtype=torch.float64 if wide else torch.float32, device=device)
                dist.recv(data, src=self.ranks[self.index - 1], group=self.group)
                upstream = list(data.unbind(0)) if rows == n else None
        both = None if xs is None or upstream is None else [*upstream, *xs]
        if both and (len({x.shape for x in both}) > 1
                     or sum(x.numel() for x in both) * (8 if both[0].dtype == torch.float64 else 4) > budget):
            both = None
        if self.last:
            return both
        wide = any(x.dtype == torch.float64 for x in both or ())
        data = (torch.stack([x.to(torch.float64 if wide else torch.float32) for x in both]) if both
                else torch.zeros(0, device=device))
        head = torch.tensor([len(both or ()), n, data.shape[-1] if both else 0, int(wide)], dtype=torch.int64,
                            device=device)
        while len(self._sent) > 1:  # at most two forwards in flight to the next stage
            self._sent.pop(0)[0].wait()
        work = dist.isend(head, dst=self.ranks[self.index + 1], group=self.group)
        self._sent.append((work, head, data))
        if both:
            self._sent.append((dist.isend(data, dst=self.ranks[self.index + 1], group=self.group), head, data))
        return None

    def close(self) -> None:
        """Wait until the next stage has received every forward sent (at exit, after the stages
        agreed on their tokens, so every message sent has its receiver)."""
        while self._sent:
            self._sent.pop(0)[0].wait()


def _stage_layers(model: nn.Module) -> tuple[int, str]:
    """A pipeline stage's decoder layer count and the path of the module list holding them."""
    from .sites import _hidden_state_sites

    try:
        found = _hidden_state_sites(model)
    except SiteError as err:
        raise ProbeError(f"a pipeline stage needs its decoder layers located; got {type(model).__name__}: {err}; "
                         "pass the stage as a model whose layers probe finds with sites='hidden_states'") from None
    layers = max((s.hf_index for s in found if s.hf_index is not None), default=0)
    # the module list of the decoder layers, whose indices the whole model's paths shift
    container = next((name for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == layers
                      and layers), "")
    return layers, container


def _shift(name: str, offset: int, container: str) -> str:
    """``name`` (a site name or module path of a stage) in the whole model: ``hidden_states.j`` and
    ``<container>.j...`` with ``j`` moved by ``offset``."""
    if not offset:
        return name
    found = re.fullmatch(r"hidden_states\.(\d+)", name)
    if found:
        return f"hidden_states.{int(found.group(1)) + offset}"
    if container:
        found = re.fullmatch(re.escape(container) + r"\.(\d+)((?:\..*)?)", name)
        if found:
            return f"{container}.{int(found.group(1)) + offset}{found.group(2)}"
    return name


def _shift_suffixed(name: str, offset: int, container: str) -> str:
    base, at, suffix = name.partition("@")
    return _shift(base, offset, container) + at + suffix


def _widen(kind: str, state: dict, offset: int, total: int, first: bool) -> dict:
    """A features shard's ``state`` at channels ``offset ..`` of ``total``: per-channel fields
    placed (the identity fill elsewhere), channel indices shifted, token counts kept by the
    group's first rank only."""
    if not state or kind not in SPECS:
        return state
    out = {}
    for f in SPECS[kind].fields:
        if f.name not in state:
            continue
        v = np.asarray(state[f.name])
        if "D" in f.shape:
            axis = f.shape.index("D")
            shape = list(v.shape)
            shape[axis] = total
            wide = np.full(shape, f.fill, dtype=v.dtype)
            index: list[Any] = [slice(None)] * v.ndim
            index[axis] = slice(offset, offset + v.shape[axis])
            wide[tuple(index)] = v
            v = wide
        elif f.name == "absmax_at":
            v = v.copy()
            if v[2] >= 0:
                v[2] += offset
        elif f.name == "channel":
            v = np.where(v >= 0, v + offset, v)
        elif (kind, f.name) in _TOKEN_COUNTS and not first:
            v = np.zeros_like(v)
        out[f.name] = v
    return cast(dict, out)
