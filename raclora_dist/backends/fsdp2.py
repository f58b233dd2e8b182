"""FSDP2 (``fully_shard``): base weights and trainable factors sharded on dim 0.

``W (m, n)`` and a right sketch's trainable ``B (m, r)`` are split into the same row chunks,
so the merge ``W_local += s * B_local @ A`` needs no communication. A left sketch's
trainable ``A (r, n)`` is small and is gathered first; each rank then adds its rows
``s * B[rows] @ A``. The sketch is a buffer: FSDP never shards, reduces or optimizes it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from raclora_dist.backends.base import Backend
from raclora_dist.backends.dist import DistComm
from raclora_dist.core import RacLoraLinear
from raclora_dist.core.layer import lowrank_fro_norm, merge_into_weight


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _row_offset(full_rows: int, rank: int, world: int) -> int:
    """First global row of ``rank``'s Shard(0) chunk (torch.chunk: ceil-sized chunks)."""
    return min(full_rows, rank * math.ceil(full_rows / world))


class FSDP2Access:
    """Reaches factors and weights through FSDP2's DTensor shards (collectives in gathers)."""

    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world

    def local_finite(self, layer: RacLoraLinear) -> bool:
        return bool(torch.isfinite(_local(layer.factor)).all())

    def full_factor(self, layer: RacLoraLinear) -> torch.Tensor:
        f = layer.factor.detach()
        return f.full_tensor() if hasattr(f, "full_tensor") else f  # all-gather: (m, r) or (r, n)

    @torch.no_grad()
    def merge(self, layer: RacLoraLinear, factor: torch.Tensor) -> float:
        if layer.merge_mode != "into_base":
            raise NotImplementedError("fsdp2 supports raclora.merge_mode=into_base")
        B, A = layer.factors_with(factor)  # refuses a non-finite factor
        W_local = _local(layer.base_layer.weight)  # (rows, n): this rank's row chunk
        start = _row_offset(layer.out_features, self.rank, self.world)
        rows = W_local.shape[0]
        if rows:
            merge_into_weight(W_local, B[start : start + rows], A, layer.scale)
        self.zero_factor(layer)
        return layer.scale * lowrank_fro_norm(B, A)

    @torch.no_grad()
    def zero_factor(self, layer: RacLoraLinear) -> None:
        _local(layer.factor).zero_()


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks (HF ``_no_split_modules`` classes), in order."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise ValueError(f"cannot find decoder layers in {type(model).__name__} to shard")
    return blocks


class FSDP2Backend(Backend):
    name = "fsdp2"

    def __init__(self, cfg, info) -> None:
        super().__init__(cfg, info)
        self.comm = DistComm(info.device)
        self.access = FSDP2Access(info.rank, info.world_size)

    def setup(self, model: nn.Module) -> None:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        model = model.to(self.info.device)
        mp = MixedPrecisionPolicy()
        if self.cfg.distributed.mixed_precision == "bf16":
            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        # Bottom-up: each decoder block is one unit (all-gathered for its forward), then the
        # root takes what is left (embeddings, final norm, head).
        for block in decoder_layers(model):
            fully_shard(block, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        self.model = model
        self.optimizer = self._make_optimizer([p for p in model.parameters() if p.requires_grad])
