"""torch.distributed plumbing: process-group setup from torchrun's environment, collectives."""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: rank, world size, local rank and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_world_size() -> int:
    """WORLD_SIZE as torchrun (or Ray Train) set it; 1 outside a launcher."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def worker_device_type(backend: str = "auto") -> str:
    """Where a worker on this machine computes: "cuda" when CUDA is available and the
    collectives are not gloo (``distributed.backend``), else "cpu"."""
    return "cuda" if torch.cuda.is_available() and backend != "gloo" else "cpu"


def init_distributed(backend: str = "auto") -> DistInfo:
    """Joins the process group torchrun described in the environment (idempotent).

    Args:
        backend: ``gloo``, ``nccl`` or ``auto`` (nccl when CUDA is available, else gloo).
    """
    world = env_world_size()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = worker_device_type(backend) == "cuda"
    device = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        pg = backend if backend != "auto" else ("nccl" if use_cuda else "gloo")
        dist.init_process_group(backend=pg)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if dist.is_initialized():
        TRAFFIC.learn_nodes()
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=device)


#: Set by the Ray Train worker to its Ray node id (:func:`node_key`).
NODE_ENV = "RACLORA_NODE_ID"


def node_key() -> str:
    """What names this process's node: the Ray node id under Ray Train (several raylets may
    share a host), else the host name and torchrun's node rank (``GROUP_RANK``)."""
    return os.environ.get(NODE_ENV) or f"{socket.gethostname()}/{os.environ.get('GROUP_RANK', '0')}"


class Traffic:
    """Bytes this process put into collectives: the payload of each call (a tensor of N bytes
    all-reduced counts N, whatever the algorithm moves on the wire). Every collective the
    trainer issues goes through :class:`DistComm`, the DDP gradient hook, the vocabulary split
    or FSDP2's counted collectives (:mod:`.fsdp2_comms`), which add here.

    ``across`` counts the part whose process group spans more than one node (:func:`node_key`,
    exchanged once when the process group is joined: :meth:`learn_nodes`).
    """

    def __init__(self) -> None:
        self.total = 0
        self.across = 0
        self.node_of: list[int] = []  # rank -> node index; empty: one node
        self._spans: dict = {}

    def learn_nodes(self) -> None:
        """Every rank's node (one all-gather of the keys). Collective: every rank calls it."""
        keys: list = [None] * dist.get_world_size()
        dist.all_gather_object(keys, node_key())
        index = {k: i for i, k in enumerate(dict.fromkeys(keys))}
        self.node_of = [index[k] for k in keys]
        self._spans.clear()

    def add(self, t: torch.Tensor, group: dist.ProcessGroup | None = None) -> None:
        """Counts ``t``'s bytes, sent over ``group`` (None: every rank)."""
        n = t.numel() * t.element_size()
        self.total += n
        if self.crosses_nodes(group):
            self.across += n

    def crosses_nodes(self, group: dist.ProcessGroup | None = None) -> bool:
        """Whether ``group`` (None: every rank) holds ranks of more than one node."""
        if not dist.is_initialized() or len(set(self.node_of)) < 2:
            return False
        key = group if group is not None else dist.group.WORLD
        if key not in self._spans:
            self._spans[key] = len({self.node_of[r] for r in dist.get_process_group_ranks(key)}) > 1
        return self._spans[key]


TRAFFIC = Traffic()


class DistComm:
    """The chain's :class:`~raclora_dist.core.chain.Comm` over a process group (default: all).

    Tensors are reduced on the collective's device (CPU for gloo, the GPU for nccl) and
    returned on the caller's device. ``rank`` is the global rank, whatever the group.
    """

    def __init__(self, device: torch.device, group: dist.ProcessGroup | None = None) -> None:
        self.device, self.group = device, group

    @property
    def rank(self) -> int:
        return dist.get_rank() if dist.is_initialized() else 0

    def _reduce(self, t: torch.Tensor, op) -> torch.Tensor:
        buf = t.to(self.device)
        TRAFFIC.add(buf, self.group)
        dist.all_reduce(buf, op=op, group=self.group)
        return buf.to(t.device)

    def all_reduce_min(self, t: torch.Tensor) -> torch.Tensor:
        return self._reduce(t, dist.ReduceOp.MIN)

    def all_reduce_max(self, t: torch.Tensor) -> torch.Tensor:
        return self._reduce(t, dist.ReduceOp.MAX)

    def all_reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        return self._reduce(t, dist.ReduceOp.SUM) / dist.get_world_size(self.group)

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return self._reduce(t, dist.ReduceOp.SUM)

    def all_gather_flat(self, local: torch.Tensor, total: int) -> torch.Tensor:
        """Concatenates every rank's slice of a flat tensor of ``total`` elements.

        Slices are the equal ``ceil(total / world)`` chunks in rank order (the last may be
        short); returned on ``local``'s device.
        """
        world = dist.get_world_size(self.group)
        chunk = -(-total // world)
        buf = torch.zeros(chunk, dtype=local.dtype, device=self.device)
        buf[: local.numel()] = local.flatten().to(self.device)
        parts = [torch.empty_like(buf) for _ in range(world)]
        TRAFFIC.add(buf, self.group)
        dist.all_gather(parts, buf, group=self.group)
        return torch.cat(parts)[:total].to(local.device)


def gather_by_broadcasts(output: torch.Tensor, input: torch.Tensor, group: dist.ProcessGroup | None = None,
                         async_op: bool = False) -> dist.Work | None:
    """``all_gather_into_tensor(output, input, group)`` as one in-place broadcast per rank into
    its slice of ``output`` (in place on ``output``).

    gloo's own all-gather receives into a temporary flat tensor as large as ``output`` and then
    copies it over: a gather held twice. gloo broadcasts in place, and each rank receives the
    same bytes (measured: docs/benchmarks.md). The broadcasts before the last one are waited
    for; the last one's work handle is returned when ``async_op`` (else it is waited for too).

    Args:
        output: flat (world * n,), contiguous; rank r's slice at r * n.
        input: (n,) this rank's part (may already be a view of its slice of ``output``).
    """
    def src(r: int) -> int:  # group rank -> global rank, as broadcast's src is
        return r if group is None else dist.get_global_rank(group, r)

    chunks = output.view(-1).split(input.numel())
    rank = dist.get_rank(group)
    if chunks[rank].data_ptr() != input.data_ptr():
        chunks[rank].copy_(input.reshape(-1))
    for r, chunk in enumerate(chunks[:-1]):
        dist.broadcast(chunk, src=src(r), group=group)
    work = dist.broadcast(chunks[-1], src=src(len(chunks) - 1), group=group, async_op=async_op)
    return work if async_op else None


def contiguous_groups(groups: int) -> dist.ProcessGroup:
    """Splits the ranks into ``groups`` groups of consecutive ranks (0..g-1, g..2g-1, ...: one
    per node when workers are packed) and returns this rank's. Collective: every rank calls it."""
    mine, _ = dist.new_subgroups(group_size=dist.get_world_size() // groups)
    return mine


def shared_token() -> str:
    """A random hex string, the same on every rank (rank 0's, broadcast). Collective when a
    process group is up: every rank calls it at the same point."""
    token = [uuid.uuid4().hex[:12]]
    if dist.is_initialized():
        dist.broadcast_object_list(token, src=0)
    return token[0]


def whole(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor (an all-gather: collective), or ``t`` itself."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
