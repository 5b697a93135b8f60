"""What people read: terminal tables (:mod:`.report`, :mod:`.research`), quantization tables
(:mod:`.quant`) and figures (:mod:`.plot`, needs ``probe[plot]``). Reads :class:`probe.results.Run`
only; imports no torch."""
