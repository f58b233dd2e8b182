"""The C heap under a run on CPUs: what it keeps of freed memory, and handing it back.

On CPUs every tensor comes from glibc's ``malloc``. Memory freed inside its heap stays in the
process (RSS) until the heap is trimmed, and a sharded model frees a lot between allocations
that stay: loading frees each part's full-precision weights between the shards it keeps, and
a training step frees each block's temporaries between the activations the backward needs.
Both would otherwise raise the first step's peak by a fraction of the model (measured,
docs/benchmarks.md). GPU memory is the caching allocator's business, not this module's.

Everything here is a no-op on other C libraries.
"""

from __future__ import annotations

import contextlib
import ctypes
import os

import torch
from torch import nn

_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
LOADING_MMAP_THRESHOLD = 1 << 20
STEADY_MMAP_THRESHOLD = 8 << 20


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return None


_LIBC = _libc()


def steady_mmap_threshold() -> int:
    """The mmap threshold after loading: glibc's own ``MALLOC_MMAP_THRESHOLD_`` (bytes) when
    the user set it, else :data:`STEADY_MMAP_THRESHOLD`."""
    try:
        return int(os.environ["MALLOC_MMAP_THRESHOLD_"])
    except (KeyError, ValueError):
        return STEADY_MMAP_THRESHOLD


def _set_mmap_threshold(nbytes: int) -> bool:
    try:
        return bool(_LIBC.mallopt(_M_MMAP_THRESHOLD, nbytes))
    except AttributeError:  # not glibc
        return False


def release_freed() -> bool:
    """Returns the heap's free pages to the OS (glibc ``malloc_trim(0)``), in place.

    Whole free pages inside the heap are released too, not only its top, so memory freed
    between allocations that stay leaves the RSS; a later allocation there costs a page
    fault per 4 KiB. Returns whether anything was released (False off glibc).
    """
    try:
        return bool(_LIBC.malloc_trim(0))
    except AttributeError:
        return False


@contextlib.contextmanager
def mapped_large_allocations():
    """While loading, serves allocations of 1 MiB and more from maps of their own (glibc).

    Loading frees large temporaries (a part's full-precision weights, the 4-bit quantizer's
    scratch, about 4x a weight) between small allocations that stay (the shards). After the
    first large free, glibc raises its mmap threshold and serves later large allocations from
    the heap, which fragments and is not returned: a rank then keeps several times its shards
    per block (measured: docs/benchmarks.md, "Large models"). On the way out
    the heap is trimmed (:func:`release_freed`), so what loading freed below 1 MiB leaves too.

    Afterwards the threshold stays at 8 MiB rather than rising to glibc's 32 MiB: a sharding
    engine gathers each block's weights for its forward and backward (tens of MiB a tensor on
    a large model), and from the heap they fragment it by a large share of a rank's memory in
    the first step (measured, docs/benchmarks.md). Activations of small models stay below 8 MiB
    and keep the heap's speed; larger ones cost a page fault per
    4 KiB, small beside the matmul that fills them. glibc's ``MALLOC_MMAP_THRESHOLD_``, when
    set, is the threshold after loading instead.
    """
    changed = _set_mmap_threshold(LOADING_MMAP_THRESHOLD)
    try:
        yield
    finally:
        if changed:
            _set_mmap_threshold(steady_mmap_threshold())
        release_freed()


def worth_releasing(device_type: str, gathers_blocks: bool, block_bytes: int) -> bool:
    """Whether a run trims the heap between its decoder blocks (:func:`release_between_blocks`).

    Where a rank's memory is the point (each block sharded and gathered for its compute) and
    each block's gather already comes in fresh pages (a map of its own above the steady mmap
    threshold), the trim's cost is small beside the block's. Elsewhere it is not: the page
    faults of reusing trimmed memory cost a replicated or a toy model a noticeable share of
    its tokens/s (measured: docs/benchmarks.md, "Large models").

    Args:
        device_type: where the activations live ("cpu"; GPU memory is not the C heap's).
        gathers_blocks: the engine's ``Backend.gathers_blocks``.
        block_bytes: the largest decoder block's weights, unsharded.
    """
    return device_type == "cpu" and gathers_blocks and block_bytes >= STEADY_MMAP_THRESHOLD


def release_between_blocks(blocks: list[nn.Module]) -> list:
    """Trims the heap (:func:`release_freed`) after each block's training forward and before
    its backward.

    A block's forward frees its temporaries (the MLP's intermediates, the gathered weights'
    staging) between the activations it saves for the backward; without a trim the heap keeps
    those holes, and RSS grows by more than the saved activations (measured:
    docs/benchmarks.md, "Large models"). Each trim costs a few milliseconds, and reusing the
    trimmed pages a page fault per 4 KiB: see :func:`worth_releasing` for where that pays.
    Hooks on ``__call__``, so an engine's own hooks and activation checkpointing's recompute
    are unaffected.

    Args:
        blocks: the decoder blocks, in order (``backends.base.decoder_layers``).

    Returns:
        The hook handles (``.remove()`` undoes it).
    """

    def after_forward(module: nn.Module, args, output):
        if not torch.is_grad_enabled():
            return  # evaluation, generation: nothing is saved between blocks, a trim buys nothing
        release_freed()
        out = output[0] if isinstance(output, (tuple, list)) else output
        if isinstance(out, torch.Tensor) and out.requires_grad:
            # Runs when the block's output gradient arrives, i.e. before its backward.
            out.register_hook(_release_on_grad)

    return [block.register_forward_hook(after_forward) for block in blocks]


def _release_on_grad(grad: torch.Tensor) -> None:
    release_freed()
