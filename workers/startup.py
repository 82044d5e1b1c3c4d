"""What every baton process does once it is initialised, before it serves."""

from __future__ import annotations

import gc


def freeze_startup_heap() -> int:
    """Takes every object alive after start-up (modules, the model's modules and parameters,
    tokenizer, metrics) out of the cyclic garbage collector's reach, as long-running Python
    servers do once initialised: while serving, a full collection then walks only what requests
    allocated instead of torch's and the model's few hundred thousand objects. On the
    state-transfer path that walk was about 8% of both processes' CPU time. Returns how many
    objects were frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
