"""Low-rank accounting of a merge: what a link meant to change and what reached the weights.

``MergeResult`` carries a merge's intended norm and its landed statistics; the helpers
compute them from small Gram matrices (no (m, n) product for a low-rank update) or row block
by row block while a dense weight is edited.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class MergeResult:
    """What merging one layer's link did.

    Attributes:
        norm: ``||s B A||_F``, the intended update's norm.
        landed: float64 (3,): ``<dW_eff, dW>``, ``||dW_eff||^2``, ``||dW||^2``, where
            ``dW = s B A`` is the intended update and ``dW_eff`` the change of the effective
            weight the forward uses; over the whole layer, or with ``rows_only`` over this
            rank's rows.
        discarded: share of the chain's energy a factored-mode recompression dropped.
        rows_only: ``landed`` covers only the rows this rank merged (the ranks' parts partition
            the layer and the chain sums them); False: the whole layer, the same on every rank
            that computed it, and the chain counts rank 0's alone.
    """

    norm: float
    landed: torch.Tensor
    discarded: float = 0.0
    rows_only: bool = False


BLOCK_ELEMENTS = 1 << 19  # a row block's elements: 2 MiB in fp32, 4 MiB as the float64 of its statistics


def block_rows(n: int) -> int:
    """Rows of an (m, n) weight that a merge edits at a time: its temporaries (the block before
    and after, the intended update, their float64 statistics) stay a few MiB each whatever the
    width, so a boundary's peak is not a multiple of the widest layer's rows (1,024 rows of a
    5,504-wide layer were 22 MiB per fp32 temporary and 45 MiB per float64 one)."""
    return max(1, BLOCK_ELEMENTS // max(1, n))


@torch.no_grad()
def merge_into_weight(weight: torch.Tensor, B: torch.Tensor, A: torch.Tensor, scale: float) -> None:
    """``weight += scale * B @ A`` in place, rounding once to the weight's dtype.

    Args:
        weight: (m, n) dense weight (or a local row shard of it, with B's matching rows).
        B: (m, r). A: (r, n).
    """
    if weight.dtype == B.dtype:
        weight.addmm_(B, A, alpha=scale)
    else:
        weight.copy_(weight.float().addmm_(B.float(), A.float(), alpha=scale))


@torch.no_grad()
def merge_rows_into_weight(weight: torch.Tensor, B: torch.Tensor, A: torch.Tensor, scale: float,
                           chunk_rows: int | None = None) -> torch.Tensor:
    """``weight += scale * B @ A`` in place (see :func:`merge_into_weight`), measuring what landed.

    Works on a block of rows at a time (``chunk_rows``, default :func:`block_rows`), so the extra
    memory is a few (chunk_rows, n) tensors.

    Args:
        weight: (m, n) dense weight, or a row shard with ``B``'s matching rows.
        B: (m, r). A: (r, n).

    Returns:
        float64 (3,): ``<dW_eff, dW>``, ``||dW_eff||^2``, ``||dW||^2`` (see :class:`MergeResult`).
    """
    out = torch.zeros(3, dtype=torch.float64)
    chunk_rows = chunk_rows or block_rows(weight.shape[1])
    for i in range(0, weight.shape[0], chunk_rows):
        rows = weight[i : i + chunk_rows]
        before = rows.float().clone()
        merge_into_weight(rows, B[i : i + chunk_rows], A, scale)
        intended = scale * (B[i : i + chunk_rows].float() @ A.float())
        out += landed_stats(rows.float() - before, intended)
    return out


def landed_stats(d_eff: torch.Tensor, intended: torch.Tensor) -> torch.Tensor:
    """float64 (3,): ``<d_eff, intended>``, ``||d_eff||^2``, ``||intended||^2``."""
    d, i = d_eff.double(), intended.double()
    return torch.stack([(d * i).sum(), (d * d).sum(), (i * i).sum()]).cpu()


def lowrank_landed(dB: torch.Tensor, dA: torch.Tensor, B: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """:func:`landed_stats` of ``dB @ dA`` against ``B @ A`` from small Gram matrices.

    ``<X Y, U V>_F = sum((X^T U) * (Y V^T))``: no (m, n) product is formed.
    """
    dB, dA, B, A = dB.double(), dA.double(), B.double(), A.double()
    inner = ((dB.T @ B) * (dA @ A.T)).sum()
    dd = ((dB.T @ dB) * (dA @ dA.T)).sum()
    ii = ((B.T @ B) * (A @ A.T)).sum()
    return torch.stack([inner, dd, ii]).cpu()


def lowrank_fro_norm(B: torch.Tensor, A: torch.Tensor) -> float:
    """``||B @ A||_F`` from r x r Gram matrices, without forming the (m, n) product.

    ``||BA||_F^2 = trace(B^T B A A^T)``; both Grams are symmetric, so the trace is the sum
    of their elementwise product.
    """
    B64, A64 = B.double(), A.double()
    return float(((B64.T @ B64) * (A64 @ A64.T)).sum().clamp_min(0).sqrt())
