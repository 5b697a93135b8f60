"""Views of the mixture-of-experts statistics of a run (numpy only).

Recipe::

    run = probe.load("moe.h5")
    r = run["model.layers.0.mlp.gate:router"].router        # RouterView
    r.counts, r.max_over_mean, r.cv, r.never_routed, r.entropy_mean
    x = run["model.layers.0.mlp.experts:experts"].experts   # ExpertsView
    x.tokens, x.mean[e], x.absmax[e], x.sum_x2[e]
    for layer in moe_layers(run): layer.router, layer.experts

Definitions (over real tokens; ``E`` experts, ``k`` per token): ``counts[e]`` is the
(token, slot) assignments to expert ``e`` (``Σ counts = k · tokens``); ``load = counts / Σ
counts``; ``max_over_mean = max(counts) / mean(counts)`` (1 when perfectly balanced, ``E`` when
one expert takes everything at ``k = 1``); ``cv`` the coefficient of variation
``std(counts) / mean(counts)`` (population std); ``balance_loss = E · Σ_e f_e P_e`` with ``f_e =
counts[e] / tokens`` and ``P_e`` the mean router probability of ``e`` (Switch Transformer's
auxiliary loss, Fedus et al. 2021, eq. 4, with top-k dispatch as transformers'
``load_balancing_loss_func`` counts it). ``rank_counts[r, e]`` is ``counts`` on capturing rank
``r`` (under ``torch.distributed``; one row in one process), and ``idle_on_a_rank`` the experts
some rank never routed a token to while others did (the case that stalls per-rank calibration).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..stats._state import ROUTER_BINS

__all__ = ["RouterView", "ExpertsView", "MoeLayerView", "moe_layers", "is_moe_site", "ROUTER_SUFFIX",
           "EXPERTS_SUFFIX", "DOWN_SUFFIX"]

ROUTER_SUFFIX = ":router"
EXPERTS_SUFFIX = ":experts"
DOWN_SUFFIX = ":down_proj"


def is_moe_site(name: str) -> bool:
    """Whether ``name`` is a mixture-of-experts site (router, experts or down projection), which
    holds only its own statistic (no moments: the general tables leave it out).

    Example:
        >>> is_moe_site("model.layers.0.mlp.gate:router"), is_moe_site("hidden_states.1")
        (True, False)
    """
    return name.endswith((ROUTER_SUFFIX, EXPERTS_SUFFIX, DOWN_SUFFIX))


class RouterView:
    """Routing statistics of one router site (see the module docstring for the definitions).

    Example:
        >>> r = RouterView({"tokens": np.int64(4), "counts": np.array([6, 2, 0]),
        ...                 "weight_sum": np.array([3.0, 1.0, 0.0]), "prob_sum": np.array([2.0, 1.5, 0.5]),
        ...                 "entropy_n": np.float64(4), "entropy_mean": np.float64(0.5),
        ...                 "entropy_m2": np.float64(0.04), "entropy_hist": np.zeros(64, np.int64),
        ...                 "weight_hist": np.zeros(64, np.int64), "nonfinite": np.int64(0)})
        >>> r.never_routed, r.max_over_mean
        ([2], 2.25)
    """

    def __init__(self, state: dict[str, np.ndarray]) -> None:
        self._s = state
        #: real tokens routed
        self.tokens = int(state["tokens"])
        #: int64 [E]: (real token, slot) assignments per expert
        self.counts = np.asarray(state["counts"], np.int64)
        self.n_experts = int(self.counts.shape[0])
        total = self.counts.sum()
        #: experts per token, as routed (``Σ counts / tokens``)
        self.top_k = float(total / self.tokens) if self.tokens else float("nan")
        #: float64 [E]: share of the assignments
        self.load = self.counts / total if total else np.full(self.n_experts, np.nan)
        mean = self.counts.mean() if self.n_experts else float("nan")
        self.max_over_mean = float(self.counts.max() / mean) if total else float("nan")
        self.cv = float(self.counts.std() / mean) if total else float("nan")
        #: experts that no real token was routed to
        self.never_routed = [int(e) for e in np.flatnonzero(self.counts == 0)]
        ws = np.asarray(state["weight_sum"], np.float64)
        #: float64 [E]: mean routing weight of the tokens routed to each expert (NaN where none)
        self.mean_weight = np.where(self.counts > 0, ws / np.maximum(self.counts, 1), np.nan)
        #: float64 [E]: mean router probability softmax(logits) per expert over real tokens
        self.mean_prob = np.asarray(state["prob_sum"], np.float64) / max(self.tokens, 1)
        n = float(state["entropy_n"])
        #: routing entropy of softmax(logits), nats: mean and (population) std over real tokens
        self.entropy_mean = float(state["entropy_mean"]) if n else float("nan")
        self.entropy_std = float(np.sqrt(float(state["entropy_m2"]) / n)) if n else float("nan")
        #: the largest possible entropy, ln E
        self.entropy_max = float(np.log(self.n_experts)) if self.n_experts else float("nan")
        #: int64 [R]: tokens per bin of entropy / ln E over [0, 1]; :attr:`edges` are the bins
        self.entropy_hist = np.asarray(state["entropy_hist"], np.int64)
        #: int64 [R]: top-k routing weights per bin over [0, 1]
        self.weight_hist = np.asarray(state["weight_hist"], np.int64)
        self.edges = np.linspace(0.0, 1.0, self.entropy_hist.shape[0] + 1 if self.entropy_hist.size else ROUTER_BINS + 1)
        self.nonfinite = int(state["nonfinite"])
        #: int64 [W, E]: ``counts`` per capturing rank (row ``r``: rank ``r`` under torch.distributed;
        #: one row in one process; files written before it: one row, the counts)
        self.rank_counts = np.asarray(state.get("rank_counts", self.counts[None]), np.int64).reshape(-1, self.n_experts)
        #: experts that some rank routed no real token to, while another did (under torch.distributed)
        self.idle_on_a_rank = ([int(e) for e in np.flatnonzero((self.rank_counts == 0).any(0) & (self.counts > 0))]
                               if self.rank_counts.shape[0] > 1 else [])
        f = self.counts / max(self.tokens, 1)
        self.balance_loss = float(self.n_experts * np.sum(f * self.mean_prob)) if self.tokens else float("nan")

    def below(self, n: int) -> list[int]:
        """Experts with fewer than ``n`` assignments."""
        return [int(e) for e in np.flatnonzero(self.counts < n)]

    def __repr__(self) -> str:
        return (f"RouterView(E={self.n_experts}, tokens={self.tokens}, max/mean={self.max_over_mean:.3g}, "
                f"cv={self.cv:.3g}, never routed={self.never_routed})")


class ExpertsView:
    """Per-expert input statistics of one experts site: arrays ``[E, D]`` (``[E]`` for tokens).

    ``sum_x2 = m2 + n · mean²`` and ``sum_x = n · mean`` (float64): what llama.cpp's imatrix sums
    per expert; ``var`` the population variance (NaN where a channel saw nothing).
    """

    def __init__(self, state: dict[str, np.ndarray]) -> None:
        self.tokens = np.asarray(state["tokens"], np.int64)
        self.n_experts, self.channels = (int(v) for v in np.shape(state["n"]))
        self.count = np.asarray(state["n"], np.float64)
        seen = self.count > 0
        self.mean = np.where(seen, np.asarray(state["mean"], np.float64), np.nan)
        m2 = np.asarray(state["m2"], np.float64)
        self.var = np.where(seen, m2 / np.maximum(self.count, 1), np.nan)
        self.absmax = np.asarray(state["absmax"], np.float64)
        self.sum_x = np.where(seen, self.count * np.nan_to_num(self.mean), 0.0)
        self.sum_x2 = np.where(seen, m2 + self.count * np.nan_to_num(self.mean) ** 2, 0.0)
        self.nonfinite = np.asarray(state["nonfinite"], np.int64)

    def __repr__(self) -> str:
        return f"ExpertsView(E={self.n_experts}, D={self.channels}, tokens={self.tokens.tolist()})"


@dataclass(frozen=True)
class MoeLayerView:
    """One mixture-of-experts layer of a run: its router and experts site names (``None`` if not captured)."""

    layer: int | None
    router: str | None
    experts: str | None
    experts_module: str | None
    #: the down projection's input site (``"<experts>:down_proj"``), if captured
    down: str | None = None


def _layer_index(module: str) -> int | None:
    found = re.findall(r"(?:^|\.)(\d+)(?=\.|$)", module)
    return int(found[0]) if found else None


def moe_layers(run: Any) -> list[MoeLayerView]:
    """The mixture-of-experts layers of ``run`` (a ``Run``), paired by their parent module, in site order."""
    by_parent: dict[str, dict[str, str]] = {}
    for info in run.meta.get("sites", []):
        name = str(info.get("name", ""))
        if info.get("phase", "prefill") != "prefill":
            continue
        for suffix, key in ((ROUTER_SUFFIX, "router"), (EXPERTS_SUFFIX, "experts"), (DOWN_SUFFIX, "down")):
            if name.endswith(suffix):
                module = str(info.get("module", ""))
                parent = module.rsplit(".", 1)[0] if "." in module else ""
                slot = by_parent.setdefault(parent, {})
                slot[key] = name
                if key != "router":
                    slot["module"] = module
    return [MoeLayerView(_layer_index(p), v.get("router"), v.get("experts"), v.get("module"), v.get("down"))
            for p, v in by_parent.items()]
