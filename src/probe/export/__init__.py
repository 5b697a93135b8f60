"""Files other tools read, one module per format (:mod:`probe.export.tensorboard`)."""
