"""Merging into a low-precision base without rounding the link away: a fp32 master copy of
the weight, and stochastic rounding.

A bf16 weight keeps 8 significant bits: a link smaller than half a unit in the last place of
an element rounds back to the old value, so ``W += s B A`` lands only part of a small update
(docs/benchmarks.md, merge fidelity). Two remedies, either or both:

* **a master copy**: the weight in fp32, (m, n), which the merge adds to; the working weight
  is rounded from it afresh each time, so rounding errors never accumulate. Sharded engines
  keep one row chunk per rank, FSDP2's ``Shard(0)`` chunks (``ceil(m / world)`` rows), so a
  row-wise merge under FSDP2 needs no communication; an engine that gathers the whole weight
  (ZeRO-3, a packed 4-bit base) gathers the master's chunks too.
* **stochastic rounding**: the merged value is rounded up or down at random with the
  probabilities that make the result unbiased, ``E[round(x)] = x``. The random bits are a
  pure function of (chain seed, link, module name, row block), so every rank and every
  world size rounds a given element the same way.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from raclora_dist.core.sketch import sketch_seed

Gather = Callable[[torch.Tensor, int], torch.Tensor]
"""``gather(local_flat, total) -> whole flat``: concatenates every rank's equal
``ceil(total / world)`` chunk of a flat tensor (a collective)."""

ROUND_BLOCK = 256
"""Rows per stochastic-rounding stream: the streams are keyed by global row block, so a row
gets the same random bits whichever rank (and however many ranks) holds it."""


def row_chunk(rows: int, rank: int, world: int) -> tuple[int, int]:
    """``[lo, hi)``: rank ``rank``'s rows of ``rows`` in FSDP2's ``Shard(0)`` layout
    (``torch.chunk``: ceil-sized chunks, the last ones short or empty)."""
    size = math.ceil(rows / world)
    return min(rows, rank * size), min(rows, (rank + 1) * size)


def gather_rows(local: torch.Tensor, rows: int, world: int, gather: Gather) -> torch.Tensor:
    """The whole (rows, n) tensor from every rank's :func:`row_chunk` (a collective).

    Args:
        local: (k, n) this rank's chunk (k may be short or 0 on the last ranks).
        rows: m, the whole tensor's rows. world: the number of ranks.
        gather: the engine's flat all-gather of equal chunks.

    Returns:
        A new (rows, n) tensor on ``local``'s device.
    """
    n = local.shape[1]
    size = math.ceil(rows / world)
    # Each chunk padded to ``size`` rows: the flat gather's equal chunks are then whole row chunks.
    return gather(local.flatten(), size * n * world).view(size * world, n)[:rows]


def round_with(x: torch.Tensor, dtype: torch.dtype, u: torch.Tensor) -> torch.Tensor:
    """Rounds fp32 ``x`` to ``dtype`` (bf16, fp16) stochastically, unbiased, with the uniform
    draws ``u`` (``x``'s shape, in [0, 1)).

    ``x`` lies between its nearest ``dtype`` value ``y`` and the neighbour ``y'`` on its other
    side; it becomes ``y'`` when ``u < (x - y) / (y' - y)``, so ``E[result] = x``.

    Returns:
        A new tensor of ``x``'s shape in ``dtype``.
    """
    y = x.to(dtype)
    d = x - y.float()
    other = torch.nextafter(y, torch.where(d > 0, torch.inf, -torch.inf).to(dtype))
    gap = other.float() - y.float()
    # x already representable (d = 0), or y the largest finite value: no rounding up.
    p = torch.where(gap.isfinite() & (gap != 0), d / gap, torch.zeros_like(d))
    return torch.where(u < p, other, y)


@torch.no_grad()
def stochastic_round_rows(x: torch.Tensor, dtype: torch.dtype, row_start: int, *, seed: int, link: int,
                          name: str) -> torch.Tensor:
    """Stochastic rounding (:func:`round_with`) of the global rows ``row_start : row_start + k`` of a layer.

    The draws of each block of :data:`ROUND_BLOCK` global rows come from a stream keyed by
    ``(seed, link, name, block)``: the result does not depend on how the rows are split.

    Args:
        x: (k, n) fp32, the rows to round.

    Returns:
        A new (k, n) tensor in ``dtype``.
    """
    out = torch.empty(x.shape, dtype=dtype, device=x.device)
    k = x.shape[0]
    first, last = row_start // ROUND_BLOCK, (row_start + k - 1) // ROUND_BLOCK
    for block in range(first, last + 1) if k else ():
        b0 = block * ROUND_BLOCK
        lo, hi = max(row_start, b0), min(row_start + k, b0 + ROUND_BLOCK)
        gen = torch.Generator().manual_seed(sketch_seed(seed, link, f"{name}#round/{block}"))
        # Draw the whole block's stream and keep this part: the same bits for a row however split.
        full = torch.empty(ROUND_BLOCK, x.shape[1])
        full.uniform_(generator=gen)
        rows = slice(lo - row_start, hi - row_start)
        out[rows] = round_with(x[rows], dtype, full[lo - b0 : hi - b0].to(x.device))
    return out

