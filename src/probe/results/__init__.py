"""The read side (numpy only, never torch): a :class:`Run` over a file or memory, its per-site
views, and the exact merge of run files. ``probe.load(path)`` returns a :class:`Run`."""

from .run import CrossView, Run, SiteView

__all__ = ["Run", "SiteView", "CrossView"]
