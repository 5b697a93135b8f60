"""What people read: terminal tables (:mod:`.report`, :mod:`.research`), quantization tables
(:mod:`.quant`), figures (:mod:`.plot`, needs ``probe[plot]``) and one self-contained HTML report
(:mod:`.html`). Reads :class:`probe.results.Run`
only; imports no torch."""

_SUBMODULES = ("html", "plot", "quant", "report", "research")


def __getattr__(name: str):
    # ``probe.present.plot.plot_run(...)`` after a bare ``import probe``: submodules load on first use
    if name in _SUBMODULES:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
