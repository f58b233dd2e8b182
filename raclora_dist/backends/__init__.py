"""Training backends: single | ddp | fsdp2 | deepspeed. Each imports its engine lazily."""

from __future__ import annotations

import importlib

from raclora_dist.backends.base import Backend
from raclora_dist.backends.dist import DistInfo

# strategy -> (module, class); "single" is the base Backend itself.
ENGINES = {
    "ddp": ("raclora_dist.backends.ddp", "DDPBackend"),
    "fsdp2": ("raclora_dist.backends.fsdp2", "FSDP2Backend"),
    "deepspeed": ("raclora_dist.backends.deepspeed", "DeepSpeedBackend"),
}


def backend_class(strategy: str) -> type[Backend]:
    """The backend class ``distributed.strategy`` names (importing its engine)."""
    if strategy == "single":
        return Backend
    module, name = ENGINES[strategy]
    return getattr(importlib.import_module(module), name)


def make_backend(cfg, info: DistInfo) -> Backend:
    """The backend ``distributed.strategy`` names."""
    return backend_class(cfg.distributed.strategy)(cfg, info)


__all__ = ["Backend", "DistInfo", "backend_class", "make_backend"]
