"""DDP: replicated weights and factors; gradients all-reduced once per optimizer step; dense merges.

With ``distributed.sync: link`` (RAC-LoRA's federated form) the workers are split into
``sync_groups`` groups of consecutive ranks. Gradients are averaged inside a group only (a
group of one is a plain model: no communication at all), so each group trains its own copy
of the link's factor; the chain averages the groups' factors once, at the boundary
(:meth:`~raclora_dist.core.chain.RacLoraChain.end_link` with ``average``). Between
boundaries the groups' factors and optimizer states differ, so a mid-link checkpoint keeps
every rank's own (``rank<r>.pt``).
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import torch
from torch import nn

from raclora_dist.backends.base import Backend
from raclora_dist.backends.dist import TRAFFIC, DistComm, contiguous_groups
from raclora_dist.backends.tensor_files import load_tensors
from raclora_dist.core import DenseAccess, LocalComm


def _counting_allreduce(group, bucket):
    """DDP's default gradient all-reduce, with its payload added to :data:`TRAFFIC`."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    TRAFFIC.add(bucket.buffer(), group)
    return allreduce_hook(group, bucket)


class DDPBackend(Backend):
    name = "ddp"

    def __init__(self, cfg, info) -> None:
        super().__init__(cfg, info)
        self.comm = DistComm(info.device)
        self.access = DenseAccess()  # replicated: the chain counts rank 0's landed statistics
        d = cfg.distributed
        self.link_sync = d.sync == "link"
        self.groups = (d.sync_groups or info.world_size) if self.link_sync else 1
        self.sync_group_size = info.world_size // self.groups

    def setup(self, model: nn.Module) -> None:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = model.to(self.info.device)
        group = None
        if self.link_sync:
            group = contiguous_groups(self.groups)
            # Per-step statistics (the logged loss) stay inside the group too: nothing crosses
            # groups between boundaries.
            self.step_comm = DistComm(self.info.device, group) if self.sync_group_size > 1 else LocalComm()
        if self.sync_group_size == 1:
            self.model = model  # a group of one: nothing to average per step
        else:
            # broadcast_buffers=False: every rank draws the sketches itself; broadcasting rank
            # 0's would hide a desynchronised rank from the fingerprint check (and cost a
            # broadcast per forward). torch 2.13 deprecates it for forward_sync_buffers, which
            # still broadcasts the buffers at init, and says to keep it until init_sync_buffers
            # exists: its FutureWarning is silenced here, where the choice is made.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated", category=FutureWarning)
                ddp = DDP(model, device_ids=[self.info.local_rank] if self.info.device.type == "cuda" else None,
                          broadcast_buffers=False, process_group=group)
            ddp.register_comm_hook(group, _counting_allreduce)
            self.model = ddp
        self.optimizer = self._make_optimizer([p for p in model.parameters() if p.requires_grad])

    def micro_batch(self, last: bool) -> contextlib.AbstractContextManager:
        """With gradient accumulation only the last micro-batch all-reduces; the others
        accumulate locally (``no_sync`` around forward and backward), to the same sum."""
        no_sync = getattr(self.model, "no_sync", None)  # DDP's; a group of one has none
        if last or no_sync is None:
            return contextlib.nullcontext()
        return no_sync()

    # -- state: per rank in link mode ---------------------------------------------------------
    def save_state(self, folder: Path) -> None:
        if not self.link_sync:
            return super().save_state(folder)
        # Mid-link the groups hold different factors and moments: every rank keeps its own
        # (at a boundary the factors are zero and the state reset, and the files are tiny).
        model: nn.Module = getattr(self.model, "module", self.model)
        trainable = {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
        torch.save({"factors": trainable, "optimizer": self.optimizer.state_dict()},
                   folder / f"rank{self.info.rank}.pt")
        if not self.optimizer.state:  # a boundary: the shared (empty) state lets sync: step resume it
            super().save_state(folder)

    def load_state(self, folder: Path) -> None:
        if not self.link_sync:
            return super().load_state(folder)
        path = folder / f"rank{self.info.rank}.pt"
        if not path.is_file():  # written by sync: step: every group starts from the shared state
            return super().load_state(folder)
        state = load_tensors(path)
        model: nn.Module = getattr(self.model, "module", self.model)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in state["factors"].items():
                params[name].copy_(value)
        self.optimizer.load_state_dict(state["optimizer"])
