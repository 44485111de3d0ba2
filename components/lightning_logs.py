"""Lightning's start-up chatter (GPU/TPU availability, tips) off unless debugging.

Lightning configures its own loggers when it is imported, after any set-up a CLI did, so
the level is set again right before a Trainer is built.
"""

from __future__ import annotations

import logging

_CHATTY = ("pytorch_lightning.utilities.rank_zero", "pytorch_lightning.accelerators.cuda",
           "lightning.pytorch.utilities.rank_zero", "lightning_fabric.utilities.rank_zero")


def quiet_lightning() -> None:
    if logging.getLogger().getEffectiveLevel() <= logging.DEBUG:
        return
    for name in _CHATTY:
        logging.getLogger(name).setLevel(logging.WARNING)
