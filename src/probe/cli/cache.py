"""``probe cache [list|clear]``: the bundled model's de-quantised copies."""

from __future__ import annotations

__all__ = ["add_parser", "command"]


def add_parser(sub) -> None:
    p = sub.add_parser("cache", help="list or remove the bundled model's de-quantised copies",
                       description="The bundled GGUF is de-quantised to float32 once and cached (about 513 MiB) "
                                   "under $PROBE_CACHE (default ~/.cache/probe), keyed by the GGUF's content.")
    p.add_argument("action", nargs="?", choices=("list", "clear"), default="list")
    p.set_defaults(func=command)


def command(args) -> int:
    from ..models import cache_entries, cache_root, clear_cache

    if args.action == "clear":
        n, size = clear_cache()
        print(f"removed {n} cached model copy(ies), {size / 2**20:.0f} MiB, from {cache_root()}")
        return 0
    entries = cache_entries()
    for path, size in entries:
        print(f"{size / 2**20:8.0f} MiB  {path}")
    print(f"{len(entries)} cached copy(ies) under {cache_root()}; remove them with: probe cache clear")
    return 0
