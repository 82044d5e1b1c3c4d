"""baton.workers.model: the Nemotron-H / Nemotron 3 model runtime.

    from baton.workers.model import load_model
    model = load_model(path, dtype=torch.bfloat16, device="cpu")
    logits = model(input_ids)                      # [B, T] -> [B, T, vocab], no cache
    cache = model.allocate_cache(num_pages, page_size, num_slots)
    hidden = model.forward_batch(ForwardBatch(...), cache)   # the engine's cache-aware step
"""

from .batch import ForwardBatch
from .cache import ModelCache
from .config import NemotronHConfig
from .loader import CheckpointError, load_model
from .model import NemotronHModel

__all__ = [
    "CheckpointError",
    "ForwardBatch",
    "ModelCache",
    "NemotronHConfig",
    "NemotronHModel",
    "load_model",
]
