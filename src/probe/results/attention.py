"""Per-head attention statistics of an attention site (``"<module>:attention"``), read side (numpy).

Recipe::

    a = run["model.layers.0.self_attn:attention"].attention   # AttentionView
    a.maxlogit, a.maxlogit_at      # [H] QK-Clip's MaxLogit per head, and (row, query pos, key pos, token)
    a.entropy_mean, a.entropy_std  # [H] attention entropy over real queries, nats
    a.sink_mass[:, 0]              # [H] mean attention probability on each query's first allowed key

Definitions (:mod:`probe.stats.attention`): the MaxLogit of head ``h`` is the largest ``q·k ·
scaling`` over the real query tokens and the keys each may attend to (before soft cap and mask
bias); the entropy of a query is ``-Σ p ln p`` of its attention probabilities (nats; its largest
value is ``ln(allowed keys)``, which the histogram divides by); ``sink_mass[h, j]`` is the mean,
over real queries, of the probability on the query's ``j``-th allowed key (``j = 0``: the first
real token under a causal or padding mask).
"""

from __future__ import annotations

import numpy as np

from ..stats._state import ATTENTION_BINS

__all__ = ["AttentionView", "SUFFIX", "is_attention_site"]

SUFFIX = ":attention"


def is_attention_site(name: str) -> bool:
    """Whether ``name`` is an attention site, which holds only its own statistic (no moments: the
    general tables leave it out; ``probe show`` prints its MaxLogit table).

    Example:
        >>> is_attention_site("model.layers.0.self_attn:attention"), is_attention_site("hidden_states.1")
        (True, False)
    """
    return name.endswith(SUFFIX)


class AttentionView:
    """Attention statistics of one attention site, per head (arrays ``[H]``; ``[H, K]`` for the sink,
    ``[H, R]`` for the histogram). NaN where a head saw no real query.

    Example:
        >>> h = 2
        >>> a = AttentionView({"tokens": np.int64(4), "maxlogit": np.array([3.5, -1.0], np.float32),
        ...     "maxlogit_at": np.array([[0, 3, 0, 17], [1, 2, 2, 5]]), "entropy_n": np.full(h, 4.0),
        ...     "entropy_mean": np.array([0.5, 1.0]), "entropy_m2": np.array([0.04, 0.0]),
        ...     "entropy_m3": np.zeros(h), "entropy_m4": np.zeros(h), "entropy_hist": np.zeros((h, 64), np.int64),
        ...     "sink": np.array([[2.0, 1.0, 0, 0], [0.4, 0, 0, 0]]), "nonfinite": np.zeros(h, np.int64)})
        >>> a.heads, a.max, a.sink_mass[:, 0].tolist()
        (2, 3.5, [0.5, 0.1])
    """

    def __init__(self, state: dict[str, np.ndarray]) -> None:
        #: real query tokens
        self.tokens = int(state["tokens"])
        #: float32 [H]: QK-Clip's MaxLogit per head (-inf where empty)
        self.maxlogit = np.asarray(state["maxlogit"], np.float32)
        self.heads = int(self.maxlogit.shape[0])
        #: int64 [H, 4]: (row, query position, key position, query token id) of each head's MaxLogit
        self.maxlogit_at = np.asarray(state["maxlogit_at"], np.int64)
        n = np.asarray(state["entropy_n"], np.float64)
        seen = n > 0
        safe = np.maximum(n, 1)
        #: float64 [H]: real queries with finite attention per head
        self.count = n
        #: float64 [H]: mean attention entropy, nats
        self.entropy_mean = np.where(seen, np.asarray(state["entropy_mean"], np.float64), np.nan)
        m2 = np.asarray(state["entropy_m2"], np.float64)
        var = m2 / safe
        #: float64 [H]: population standard deviation of the entropy, nats
        self.entropy_std = np.where(seen, np.sqrt(var), np.nan)
        with np.errstate(divide="ignore", invalid="ignore"):
            #: float64 [H]: skewness and excess kurtosis of the entropy (NaN for a constant entropy)
            self.entropy_skew = np.where(seen & (var > 0), np.asarray(state["entropy_m3"]) / safe / var ** 1.5, np.nan)
            self.entropy_kurtosis = np.where(seen & (var > 0),
                                             np.asarray(state["entropy_m4"]) / safe / var ** 2 - 3.0, np.nan)
        #: int64 [H, R]: real queries per bin of entropy / ln(allowed keys); :attr:`edges` are the bins
        self.entropy_hist = np.asarray(state["entropy_hist"], np.int64)
        self.edges = np.linspace(0.0, 1.0, (self.entropy_hist.shape[-1] if self.entropy_hist.size else ATTENTION_BINS) + 1)
        #: float64 [H, K]: mean probability on each query's j-th allowed key (the sink)
        self.sink_mass = np.asarray(state["sink"], np.float64) / safe[:, None]
        self.sink_mass[~seen] = np.nan
        #: int64 [H]: real queries left out (non-finite logits, or no allowed key)
        self.nonfinite = np.asarray(state["nonfinite"], np.int64)

    @property
    def max(self) -> float:
        """The largest MaxLogit over heads (``-inf`` when nothing was seen)."""
        return float(self.maxlogit.max()) if self.heads else float("-inf")

    @property
    def argmax_head(self) -> int:
        """The head with the largest MaxLogit."""
        return int(np.argmax(self.maxlogit))

    def __repr__(self) -> str:
        return (f"AttentionView(H={self.heads}, tokens={self.tokens}, maxlogit={self.max:.4g} (head "
                f"{self.argmax_head}), entropy={np.nanmean(self.entropy_mean):.3g} nats)")
