"""FSDP2 (``fully_shard``): base weights and trainable factors sharded on dim 0.

``W (m, n)`` and a right sketch's trainable ``B (m, r)`` are split into the same row chunks,
so the merge ``W_local += s * B_local @ A`` needs no communication. A left sketch's
trainable ``A (r, n)`` is small and is gathered first; each rank then adds its rows
``s * B[rows] @ A``. The sketch is a buffer: FSDP never shards, reduces or optimizes it.

A 4-bit base is sharded as its packed codes (a flat (P, 1) tensor), whose chunks do not
follow W's rows or quantization blocks; its merge gathers the codes, requantizes the whole
layer identically on every rank, and keeps the rank's chunk. A factored chain's frozen
``chain_B (m, cap)`` / ``chain_A (cap, n)`` are sharded on dim 0 too and are gathered,
appended to, and re-sliced the same way (both are small next to W).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import nn

from raclora_dist.backends.base import Backend, decoder_layers, shard_masters
from raclora_dist.backends.dist import DistComm, whole
from raclora_dist.backends.fsdp2_compat import fully_shard_4bit
from raclora_dist.backends.fsdp2_gloo import gather_for_gloo
from raclora_dist.config import CPU_OFFLOAD_NEEDS_GPU, ConfigError
from raclora_dist.core import RacLoraLinear
from raclora_dist.core.layer import MergeView


def _is_linear_unit(m: nn.Module) -> bool:
    """A RAC-LoRA layer (with its base inside), or a linear layer (bitsandbytes' 4-bit ones
    are ``nn.Linear`` subclasses) not inside one."""
    return isinstance(m, (RacLoraLinear, nn.Linear))


def inner_units(block: nn.Module, unit: str) -> list[nn.Module]:
    """The modules inside ``block`` that are FSDP2 units of their own for ``unit``
    (block: none; sublayer: each child holding a linear unit; linear: each linear unit)."""
    if unit == "sublayer":
        return [c for c in block.children() if any(_is_linear_unit(m) for m in c.modules())]
    if unit != "linear":
        return []
    units, inside = [], []
    for name, m in block.named_modules():
        if name and not any(name.startswith(p) for p in inside) and _is_linear_unit(m):
            units.append(m)
            inside.append(name + ".")  # a RAC-LoRA layer's base goes with it
    return units


def _local_bytes(module: nn.Module) -> int:
    """The bytes of ``module``'s parameters this rank holds (all of them before sharding)."""
    return sum(_local(p).nbytes for p in module.parameters())


def _fully_shard(module: nn.Module, **kwargs) -> None:
    """``fully_shard`` (4-bit safe), with the gather of :mod:`.fsdp2_gloo` on gloo."""
    fully_shard_4bit(module, **kwargs)
    gather_for_gloo(module)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _row_offset(full_rows: int, rank: int, world: int) -> int:
    """First global row of ``rank``'s Shard(0) chunk (torch.chunk: ceil-sized chunks)."""
    return min(full_rows, rank * math.ceil(full_rows / world))


def _write_shard(param: torch.Tensor, full: torch.Tensor, rank: int, world: int) -> None:
    """Copies this rank's Shard(0) chunk of ``full`` into ``param``'s local shard (in place)."""
    local = _local(param)
    start = _row_offset(full.shape[0], rank, world)
    if local.shape[0]:
        local.copy_(full[start : start + local.shape[0]])


class FSDP2Access:
    """Reaches factors and weights through FSDP2's DTensor shards (collectives in gathers).

    Args:
        rank, world: this rank's place among the ranks a copy of the model is sharded over
            (all of them; under HSDP its replica group's) and their number.
        comm: collectives over those ranks (the gathers of a master copy's row chunks).
        replica: this rank's replica group (HSDP; 0 otherwise): every group merges the same
            rows, and group 0's landed statistics are the ones counted.
    """

    def __init__(self, rank: int, world: int, comm: DistComm | None = None, replica: int = 0) -> None:
        self.rank, self.world, self.comm, self.replica = rank, world, comm, replica

    def local_finite(self, layer: RacLoraLinear) -> bool:
        return bool(torch.isfinite(_local(layer.factor)).all())

    def full_factor(self, layer: RacLoraLinear) -> torch.Tensor:
        f = layer.factor.detach()
        return whole(f)  # all-gather: (m, r) or (r, n)

    @contextlib.contextmanager
    def merge_view(self, layer: RacLoraLinear) -> Iterator[MergeView]:
        target = layer.merge_target
        if target == "rows":
            # Each rank owns its rows of W and merges them with no communication; the landed
            # statistics of the ranks' rows add up to the layer's.
            weight = layer.base_layer.weight
            yield MergeView(weight=_local(weight), row_start=_row_offset(layer.out_features, self.rank, self.world),
                            rows_only=True, owner=self.replica == 0)
            return
        # The packed codes' chunks follow neither W's rows nor its quantization blocks, and a
        # chain recompression mixes all rows: gather the whole tensor, let every rank compute
        # the same result, keep this rank's chunk.
        params = [layer.chain_B, layer.chain_A] if target == "chain" else [layer.base_layer.weight]
        full = [p.full_tensor() for p in params]
        if target == "chain":
            full = [t.clone() for t in full]
            yield MergeView(chain_B=full[0], chain_A=full[1])
        else:
            yield MergeView(weight=full[0], gather=self.comm.all_gather_flat, owner=self.rank == 0 and self.replica == 0)
        for p, gathered in zip(params, full):
            _write_shard(p, gathered, self.rank, self.world)

    @torch.no_grad()
    def zero_factor(self, layer: RacLoraLinear) -> None:
        _local(layer.factor).zero_()


class FSDP2Backend(Backend):
    name = "fsdp2"

    def __init__(self, cfg, info) -> None:
        super().__init__(cfg, info)
        if cfg.distributed.cpu_offload and info.device.type == "cpu":
            # torch's CPUOffloadPolicy moves shards between an accelerator and the host; it
            # fails deep inside the first all-gather when there is no accelerator.
            raise ConfigError(f"distributed.cpu_offload: {CPU_OFFLOAD_NEEDS_GPU}")
        self.comm = DistComm(info.device)
        # HSDP (distributed.replicas): replica groups of contiguous ranks, each sharding the
        # model over its own ranks; mesh[i] = ranks i*s .. i*s+s-1. Built in setup (collective).
        self.replicas = cfg.distributed.replicas
        self.shards = info.world_size // self.replicas
        self.shard_rank, self.replica = info.rank % self.shards, info.rank // self.shards
        self.mesh = None
        self.access = FSDP2Access(self.shard_rank, self.shards, self.comm, self.replica)

    def _shard_kwargs(self) -> dict:
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy

        kwargs: dict = {"mp_policy": MixedPrecisionPolicy(), "mesh": self.device_mesh()}
        if self.cfg.distributed.mixed_precision == "bf16":
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if self.cfg.distributed.cpu_offload:
            # Shards (and the optimizer step on them) live in CPU memory; each unit's
            # parameters are copied to the device for its forward and backward only.
            kwargs["offload_policy"] = CPUOffloadPolicy()
        return kwargs

    def device_mesh(self):
        """None (FSDP2's default: shard over every rank), or HSDP's 2-D mesh (replicate, shard),
        built on first use; every rank builds it at the same point (collective)."""
        if self.replicas == 1:
            return None
        if self.mesh is None:
            from torch.distributed.device_mesh import init_device_mesh

            self.mesh = init_device_mesh(self.info.device.type, (self.replicas, self.shards),
                                         mesh_dim_names=("replicate", "shard"))
            # A master copy's row chunks are gathered over the ranks that shard the layer.
            self.access.comm = DistComm(self.info.device, self.mesh.get_group("shard"))
        return self.mesh

    @property
    def splits_vocab(self) -> bool:
        return self.gathers_blocks and self.cfg.distributed.vocab_parallel

    @property
    def gathers_blocks(self) -> bool:
        return self.info.world_size > 1

    def shard_unit(self, module: nn.Module, own_unit: bool) -> None:
        shard_masters(module, self.shard_rank, self.shards)
        if own_unit:
            self._shard_block(module)

    def _shard_block(self, module: nn.Module) -> None:
        """One unit per block, inside which (``distributed.fsdp_unit``) each sublayer holding
        linear layers (attention, MLP) or each linear layer (a RAC-LoRA layer with its base, or
        a plain/4-bit linear) is a unit of its own; the block's unit keeps the rest (norms)."""
        kwargs = self._shard_kwargs()
        unit = self.cfg.distributed.fsdp_unit_on(self.info.device.type, _local_bytes(module))
        for m in inner_units(module, unit):
            _fully_shard(m, **kwargs)
        _fully_shard(module, **kwargs)

    def setup(self, model: nn.Module) -> None:
        from torch.distributed.fsdp import FSDPModule

        kwargs = self._shard_kwargs()
        # Bottom-up: each decoder block is one unit (all-gathered for its forward), then the
        # root takes what is left (final norm, small leftovers). Blocks loaded through
        # shard_unit are sharded already.
        for block in decoder_layers(model):
            if not isinstance(block, FSDPModule):
                shard_masters(block, self.shard_rank, self.shards)
                self._shard_block(block)
        _fully_shard(model, **kwargs)
        self.model = model
        self.optimizer = self._make_optimizer([p for p in model.parameters() if p.requires_grad])
