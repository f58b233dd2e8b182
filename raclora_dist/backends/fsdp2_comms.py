"""FSDP2's collectives, counted: its all-gathers, reduce-scatters and HSDP's all-reduce add
their payload to :data:`~raclora_dist.backends.dist.TRAFFIC` (with the group, so that bytes
across nodes are told apart from bytes inside one).

FSDP2 issues these itself, below the trainer. Its default all-gather and reduce-scatter are
replaced by subclasses that count and then do exactly what the defaults do (FSDP2 checks for
its defaults by ``isinstance``, so nothing else changes); on gloo the all-gather is
:mod:`.fsdp2_gloo`'s, which counts itself. HSDP's all-reduce across replica groups is counted
by FSDP2's all-reduce hook, which sees its output. On a torch without these hooks nothing is
counted (the records then show the trainer's own collectives only).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import torch
import torch.distributed as dist
from torch import nn

if TYPE_CHECKING:
    from torch.distributed.fsdp import FSDPModule

from raclora_dist.backends.dist import TRAFFIC


def _defaults() -> tuple[type, type] | None:
    try:
        from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultAllGather, DefaultReduceScatter
    except ImportError:
        return None
    return DefaultAllGather, DefaultReduceScatter


def counting_comms():
    """A counting all-gather and reduce-scatter (FSDP2's defaults plus a count), or None."""
    defaults = _defaults()
    if defaults is None:
        return None
    all_gather, reduce_scatter = defaults

    class CountingAllGather(all_gather):
        def __call__(self, output_tensor, input_tensor, group, async_op=False):
            TRAFFIC.add(input_tensor, group)  # this rank's shard, as DistComm counts a gather
            return super().__call__(output_tensor, input_tensor, group, async_op)

    class CountingReduceScatter(reduce_scatter):
        def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
            TRAFFIC.add(input_tensor, group)  # the whole gradient put in, as an all-reduce counts
            return super().__call__(output_tensor, input_tensor, group, op, async_op)

    return CountingAllGather(), CountingReduceScatter()


def count_collectives(unit: nn.Module, replicate_group: dist.ProcessGroup | None = None,
                      all_gather: bool = True) -> None:
    """Makes the FSDP2 unit ``unit`` count its collectives.

    Args:
        replicate_group: HSDP's group across replicas (its all-reduce is counted there);
            None: no HSDP (the all-reduce hook is left to the user).
        all_gather: also replace the all-gather (False: it is a custom one that counts itself).
    """
    if not hasattr(unit, "set_custom_reduce_scatter"):
        return
    comms = counting_comms()
    if comms is None:
        return
    gather, scatter = comms
    fsdp = cast("FSDPModule", unit)  # fully_shard made it one
    if all_gather:
        fsdp.set_custom_all_gather(gather)
    fsdp.set_custom_reduce_scatter(scatter)
    if replicate_group is not None:
        def counted(reduce_output: torch.Tensor) -> None:
            TRAFFIC.add(reduce_output, replicate_group)

        fsdp.set_all_reduce_hook(counted)
