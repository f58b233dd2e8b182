"""DDP: replicated weights and factors; gradients all-reduced once per optimizer step; dense merges."""

from __future__ import annotations

import contextlib

from torch import nn

from raclora_dist.backends.base import Backend
from raclora_dist.backends.dist import DistComm
from raclora_dist.core import DenseAccess


class DDPBackend(Backend):
    name = "ddp"

    def __init__(self, cfg, info) -> None:
        super().__init__(cfg, info)
        self.comm = DistComm(info.device)
        self.access = DenseAccess()  # replicated: the chain counts rank 0's landed statistics

    def setup(self, model: nn.Module) -> None:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = model.to(self.info.device)
        # broadcast_buffers=False: every rank draws the sketches itself; broadcasting rank
        # 0's would hide a desynchronised rank from the fingerprint check (and cost a
        # broadcast per forward).
        self.model = DDP(model, device_ids=[self.info.local_rank] if self.info.device.type == "cuda" else None,
                         broadcast_buffers=False)
        self.optimizer = self._make_optimizer([p for p in model.parameters() if p.requires_grad])

    def micro_batch(self, last: bool) -> contextlib.AbstractContextManager:
        """With gradient accumulation only the last micro-batch all-reduces; the others
        accumulate locally (``no_sync`` around forward and backward), to the same sum."""
        return contextlib.nullcontext() if last else self.model.no_sync()
