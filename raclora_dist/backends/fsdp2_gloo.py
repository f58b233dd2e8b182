"""FSDP2's all-gather over gloo (CPU workers) without gloo's staging copy.

gloo's ``all_gather_into_tensor`` gathers into a temporary flat tensor as large as its
output and then copies it into the output (as much again as the gathered bytes above the
buffers). FSDP2 all-gathers a whole unit (a decoder block) at once and
copies it out into its parameters, so on CPU workers a block is held three times while it
is gathered. :class:`BroadcastAllGather` fills the same output with one broadcast per rank
into that rank's slice, which gloo does in place (``dist.gather_by_broadcasts``; measured:
docs/benchmarks.md); the bytes each rank receives are the same. It also lets FSDP2 free the
gathered output right after its copy-out (see the class). NCCL gathers in place already and
keeps FSDP2's default, whose deferred free overlaps a GPU's copy-out with the next gather.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, cast

import torch
import torch.distributed as dist
from torch import nn

from raclora_dist.backends.dist import TRAFFIC, gather_by_broadcasts

if TYPE_CHECKING:
    from torch.distributed.fsdp import FSDPModule


def _all_gather_base() -> type:
    from torch.distributed.fsdp._fully_shard._fsdp_api import AllGather  # torch >= 2.8

    return AllGather


def supported() -> bool:
    """Whether this torch lets FSDP2 take a custom all-gather (``set_custom_all_gather``)."""
    from torch.distributed.fsdp import FSDPModule

    try:
        _all_gather_base()
    except ImportError:
        return False
    return hasattr(FSDPModule, "set_custom_all_gather")


def broadcast_all_gather():
    """A new :class:`BroadcastAllGather` (built here so the module imports on any torch)."""

    class BroadcastAllGather(_all_gather_base()):
        """FSDP2's all-gather as one in-place broadcast per rank into its slice of the
        output. It always returns the last broadcast's work handle (the others are done):
        given none, FSDP2's forward keeps each unit's all-gather output alive until the next
        unit's gather (to overlap a GPU's copy-out with it), a second copy of the block for
        the whole of its forward; with a handle it frees the output right after copy-out."""

        def allocate(self, size: Sequence[int], *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
            return torch.empty(*size, dtype=dtype, device=device)

        def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor,
                     group: dist.ProcessGroup, async_op: bool = False) -> dist.Work:
            """Args:
                output_tensor: flat (world * n,), rank r's slice at r * n (FSDP2 has usually
                    copied this rank's input there already: ``input_tensor`` is then a view).
                input_tensor: flat (n,), this rank's shard.
            """
            TRAFFIC.add(input_tensor, group)  # this rank's shard, as a gather counts it
            return cast(dist.Work, gather_by_broadcasts(output_tensor, input_tensor, group, async_op=True))

    return BroadcastAllGather()


def gather_for_gloo(module: nn.Module) -> bool:
    """On gloo (CPU workers), makes the FSDP2 unit ``module`` all-gather by broadcasts
    (:func:`broadcast_all_gather`); otherwise, or on a torch without the hook, changes nothing.

    Returns:
        Whether it did."""
    if dist.get_backend() != "gloo" or not supported():
        return False
    cast("FSDPModule", module).set_custom_all_gather(broadcast_all_gather())
    return True
