"""Training backends: single | ddp | fsdp2 | deepspeed. Each imports its engine lazily."""

from __future__ import annotations

from raclora_dist.backends.base import Backend
from raclora_dist.backends.dist import DistInfo


def make_backend(cfg, info: DistInfo) -> Backend:
    """The backend ``distributed.strategy`` names."""
    strategy = cfg.distributed.strategy
    if strategy == "single":
        return Backend(cfg, info)
    if strategy == "ddp":
        from raclora_dist.backends.ddp import DDPBackend

        return DDPBackend(cfg, info)
    if strategy == "fsdp2":
        from raclora_dist.backends.fsdp2 import FSDP2Backend

        return FSDP2Backend(cfg, info)
    from raclora_dist.backends.deepspeed import DeepSpeedBackend

    return DeepSpeedBackend(cfg, info)


__all__ = ["Backend", "DistInfo", "make_backend"]
