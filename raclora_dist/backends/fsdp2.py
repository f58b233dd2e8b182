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

With groups (HSDP's ``distributed.replicas``, or link-sync's ``sync_groups``) the workers form
a 2-D mesh of contiguous ranks, ``(groups, ranks per group)``; "rank" and "world" above are
then the rank's place in its group and the group's size, and every group merges the same rows.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from raclora_dist.backends.base import Backend, Layout, decoder_layers, shard_masters
from raclora_dist.backends.dist import DistComm, whole
from raclora_dist.backends.fsdp2_comms import count_collectives
from raclora_dist.backends.fsdp2_compat import fully_shard_4bit
from raclora_dist.backends.fsdp2_gloo import gather_for_gloo
from raclora_dist.backends.tensor_files import load_tensors
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
    units: list[nn.Module] = []
    inside: list[str] = []
    for name, m in block.named_modules():
        if name and not any(name.startswith(p) for p in inside) and _is_linear_unit(m):
            units.append(m)
            inside.append(name + ".")  # a RAC-LoRA layer's base goes with it
    return units


def _local_bytes(module: nn.Module) -> int:
    """The bytes of ``module``'s parameters this rank holds (all of them before sharding)."""
    return sum(_local(p).nbytes for p in module.parameters())


def _fully_shard(module: nn.Module, replicate_group=None, **kwargs) -> None:
    """``fully_shard`` (4-bit safe), with the gather of :mod:`.fsdp2_gloo` on gloo, its
    collectives counted (:mod:`.fsdp2_comms`; ``replicate_group``: HSDP's, whose all-reduce
    is counted)."""
    fully_shard_4bit(module, **kwargs)
    own_gather = gather_for_gloo(module)
    count_collectives(module, replicate_group, all_gather=not own_gather)


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

    def local_factor(self, layer: RacLoraLinear) -> torch.Tensor:
        return _local(layer.factor.detach())  # this rank's Shard(0) rows

    @contextlib.contextmanager
    def merge_view(self, layer: RacLoraLinear) -> Iterator[MergeView]:
        target = layer.merge_target
        if target == "rows":
            # Each rank owns its rows of W and merges them with no communication; the landed
            # statistics of the ranks' rows add up to the layer's.
            weight = layer.base_weight
            yield MergeView(weight=_local(weight), row_start=_row_offset(layer.out_features, self.rank, self.world),
                            rows_only=True, owner=self.replica == 0)
            return
        # The packed codes' chunks follow neither W's rows nor its quantization blocks, and a
        # chain recompression mixes all rows: gather the whole tensor, let every rank compute
        # the same result, keep this rank's chunk.
        params = [layer.chain_B, layer.chain_A] if target == "chain" else [layer.base_weight]
        full = [whole(p) for p in params]
        if target == "chain":
            full = [t.clone() for t in full]
            yield MergeView(chain_B=full[0], chain_A=full[1])
        else:
            gather = self.comm.all_gather_flat if self.comm else None  # None: one process holds it all
            yield MergeView(weight=full[0], gather=gather, owner=self.rank == 0 and self.replica == 0)
        for p, gathered in zip(params, full, strict=False):
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
        comm = DistComm(info.device)
        self.comm = comm
        # Groups of contiguous ranks, each sharding the model over its own ranks; mesh[i] =
        # ranks i*s .. i*s+s-1, built on first use (collective). HSDP (distributed.replicas)
        # reduces the gradients across groups at every step; link-sync (sync: link,
        # sync_groups) lets each group train its own link and averages the factors at the
        # boundary, over the ranks that hold the same shard.
        d = cfg.distributed
        self.link_sync = d.sync == "link"
        self.shards = self.layout.weight_ranks
        self.replicas = info.world_size // self.shards
        if self.link_sync:
            self.sync_group_size = self.shards
        self.shard_rank, self.replica = info.rank % self.shards, info.rank // self.shards
        self.mesh = None
        self.access = FSDP2Access(self.shard_rank, self.shards, comm, self.replica)

    @classmethod
    def plan(cls, cfg, world: int) -> Layout:
        """Each group of ranks (HSDP's replicas, link-sync's groups, else all) shards the
        weights, gradients and optimizer state over its own ranks."""
        d = cfg.distributed
        groups = (d.sync_groups or world) if d.sync == "link" else d.replicas
        shards = world // groups
        return Layout(weight_ranks=shards, state_ranks=shards, splits_vocab=shards > 1 and d.vocab_parallel,
                      gather_unit=d.fsdp_unit_on, weights_offloaded=d.cpu_offload, state_offloaded=d.cpu_offload)

    def _shard_kwargs(self) -> dict:
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy

        mesh = self.device_mesh()
        kwargs: dict = {"mp_policy": MixedPrecisionPolicy()}
        if mesh is not None:
            # HSDP shards over the 2-D mesh (FSDP2 reduces across its replicate dimension);
            # link-sync over the group's ranks only (nothing crosses groups during a link).
            kwargs["mesh"] = mesh["shard"] if self.link_sync else mesh
            if not self.link_sync:
                kwargs["replicate_group"] = mesh.get_group("replicate")
        if self.cfg.distributed.mixed_precision == "bf16":
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if self.cfg.distributed.cpu_offload:
            # Shards (and the optimizer step on them) live in CPU memory; each unit's
            # parameters are copied to the device for its forward and backward only.
            kwargs["offload_policy"] = CPUOffloadPolicy()
        return kwargs

    def device_mesh(self):
        """None (FSDP2's default: shard over every rank), or the 2-D mesh (replicate, shard)
        of the groups, built on first use; every rank builds it at the same point (collective)."""
        if self.replicas == 1 and not self.link_sync:
            return None
        if self.mesh is None:
            from torch.distributed.device_mesh import init_device_mesh

            self.mesh = init_device_mesh(self.info.device.type, (self.replicas, self.shards),
                                         mesh_dim_names=("replicate", "shard"))
            shard = DistComm(self.info.device, self.mesh.get_group("shard"))
            # A master copy's row chunks are gathered over the ranks that shard the layer.
            self.access.comm = shard
            if self.link_sync:  # the logged loss: the group's own (nothing crosses groups in a link)
                self.step_comm = shard
        return self.mesh

    def link_average(self):
        """Link-sync: each rank averages its shards with the ranks that hold the same rows in
        the other groups (one all-reduce over the replicate dimension)."""
        if not self.link_sync:
            return False
        return DistComm(self.info.device, self.device_mesh().get_group("replicate"))

    def vocab_split(self):
        """Under HSDP, within the replica group: its activations never cross groups."""
        mesh = self.device_mesh()
        if mesh is None:
            return super().vocab_split()
        return self.shard_rank, self.shards, mesh.get_group("shard")

    def shard_unit(self, module: nn.Module, own_unit: bool) -> None:
        shard_masters(module, self.shard_rank, self.shards)
        if own_unit:
            self._shard_block(module)

    def _shard_block(self, module: nn.Module) -> None:
        """One unit per block, inside which (``distributed.fsdp_unit``) each sublayer holding
        linear layers (attention, MLP) or each linear layer (a RAC-LoRA layer with its base, or
        a plain/4-bit linear) is a unit of its own; the block's unit keeps the rest (norms)."""
        kwargs = self._shard_kwargs()
        unit = self.layout.gather_unit(self.info.device.type, _local_bytes(module))
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
        # The root returns its logits as a view (transformers slices them), and FSDP2 warns
        # once per process that an in-place op on it would skip the backward's all-gather. The
        # loss is computed inside the forward and nothing writes to the logits after it.
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor", category=UserWarning)
        self.model = model
        self.optimizer = self._make_optimizer([p for p in model.parameters() if p.requires_grad])

    # -- state: per group mid-link under link-sync ----------------------------------------------
    def save_state(self, folder: Path) -> None:
        """Under link-sync mid-link the groups hold different factors and moments: the first
        rank of each group writes its group's, whole (``group<G>.pt``); at a boundary (factors
        zero, state reset) the shared state as in sync: step."""
        if not (self.link_sync and self.optimizer.state):
            return super().save_state(folder)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        # Both gather over the group's mesh (collective for its ranks); no cpu_offload, which
        # would keep the result on global rank 0 only.
        factors = {n: whole(p.detach()).cpu() for n, p in self.model.named_parameters() if p.requires_grad}
        state = get_optimizer_state_dict(self.model, self.optimizer, options=StateDictOptions(full_state_dict=True))
        if self.shard_rank == 0:
            torch.save({"factors": factors, "optimizer": state}, folder / f"group{self.replica}.pt")

    def load_state(self, folder: Path) -> None:
        path = folder / f"group{self.replica}.pt"
        if not (self.link_sync and path.is_file()):
            return super().load_state(folder)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        state = load_tensors(path)
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, value in state["factors"].items():
                _write_shard(params[name], value.to(_local(params[name]).device), self.shard_rank, self.shards)
        set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
