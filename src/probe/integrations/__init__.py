"""Thin adapters to training frameworks. Imported on demand; ``import probe`` does not load them.

    from probe.integrations import ProbeCallback
    trainer = Trainer(model, args, train_dataset=ds, callbacks=[ProbeCallback(out="train.h5", every=50)])
"""

from .hf import ProbeCallback

__all__ = ["ProbeCallback"]
