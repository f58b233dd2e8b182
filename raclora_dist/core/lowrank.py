"""The chain's low-rank math: its product in the forward, appending a link, recompressing.

Export: T merged links of rank r are one LoRA of rank T*r.
``B_cat = [s B_1 | ... | s B_T]`` (m, T r), ``A_cat = [A_1; ...; A_T]`` (T r, n), so
``B_cat @ A_cat = sum_t s B_t A_t``. The scale is folded into ``B_cat``; an exported PEFT
adapter therefore uses ``lora_alpha = r_total`` (PEFT scale 1).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch


@contextlib.contextmanager
def _one_thread(device: torch.device) -> Iterator[None]:
    """Runs CPU linear algebra on one thread. The QR and SVD here are of thin (d, R) matrices:
    with two OpenMP threads MKL took 45 ms for a (576, 36) QR that one thread does in 0.2 ms
    (measured on the 2-core CI machine), so threads only cost."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def concat_links(
    links: Sequence[tuple[torch.Tensor, torch.Tensor]], scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacks per-link factors into one LoRA.

    Args:
        links: ``(B_t (m, r), A_t (r, n))`` per merged link, unscaled.
        scale: s, folded into the returned B.

    Returns:
        ``(B_cat (m, T r), A_cat (T r, n))`` with ``B_cat @ A_cat = s * sum_t B_t @ A_t``.
    """
    if not links:
        raise ValueError("the chain has no merged links to export")
    B_cat = torch.cat([scale * B for B, _ in links], dim=1)
    A_cat = torch.cat([A for _, A in links], dim=0)
    return B_cat, A_cat


def compress_lora(
    B: torch.Tensor, A: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-``rank`` approximation of ``B @ A`` without forming it.

    QR of both factors reduces the problem to an SVD of a small (R x R) core:
    ``B = Qb Rb``, ``A^T = Qa Ra``, ``B A = Qb (Rb Ra^T) Qa^T``.

    Args:
        B: (m, R). A: (R, n). rank: k <= R.

    Returns:
        ``(B_k (m, k), A_k (k, n), discarded)``, with ``discarded`` the fraction of the
        squared Frobenius norm (energy) of ``B @ A`` that the truncation drops.
    """
    R = B.shape[1]
    if rank >= R:
        return B.clone(), A.clone(), 0.0
    dtype = B.dtype
    with _one_thread(B.device):
        qb, rb = torch.linalg.qr(B.double())
        qa, ra = torch.linalg.qr(A.double().T)
        u, s, vh = torch.linalg.svd(rb @ ra.T)
    total = float((s**2).sum())
    discarded = float((s[rank:] ** 2).sum()) / total if total > 0 else 0.0
    B_k = (qb @ u[:, :rank]) * s[:rank]
    A_k = vh[:rank] @ qa.T
    return B_k.to(dtype), A_k.to(dtype), discarded


class _ChainProduct(torch.autograd.Function):
    """``x A^T B^T`` through frozen chain factors held in any dtype, computed in ``x``'s.

    Autograd would save the cast copies of a bf16 chain for the backward (an fp32 copy of the
    whole chain per step); this saves the stored tensors and casts again in the backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(A, B)
        return (x @ A.T.to(x.dtype)) @ B.T.to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        A, B = ctx.saved_tensors
        return (grad @ B.to(grad.dtype)) @ A.to(grad.dtype), None, None


def chain_product(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``(x @ A^T) @ B^T`` in ``x``'s dtype, differentiable in ``x`` only.

    Args:
        x: (..., n). A: (R, n), B: (m, R): frozen, in any floating dtype (the chain's).

    Returns:
        (..., m) in ``x``'s dtype; the backward keeps ``A`` and ``B`` as stored, no cast copy.
    """
    return _ChainProduct.apply(x, A, B)


@torch.no_grad()
def append_to_chain(chain_B: torch.Tensor, chain_A: torch.Tensor, R: int, sB: torch.Tensor,
                    A: torch.Tensor) -> tuple[int, float, torch.Tensor, torch.Tensor]:
    """Adds the link ``sB @ A`` to a chain whose first ``R`` columns are filled (in place).

    While it fits, the link is appended (rounded to the chain's dtype). Once ``R + r`` exceeds
    the capacity, the chain and the link are recompressed together to the capacity in fp32 or
    better: QR of both factors and an SVD of the small core (:func:`compress_lora`), the best
    approximation of that rank, rounded once into the chain; the energy it drops is returned.

    Args:
        chain_B: (m, cap), chain_A: (cap, n): the chain, scale folded into ``chain_B``.
        R: columns filled. sB: (m, r) the link's scaled B. A: (r, n).

    Returns:
        ``(new R, discarded energy share, dB (m, k), dA (k, n))`` where ``dB @ dA`` is the
        change of ``chain_B @ chain_A`` (for the landed statistics).
    """
    r, cap = A.shape[0], chain_A.shape[0]
    if R + r <= cap:
        chain_B[:, R : R + r] = sB
        chain_A[R : R + r] = A
        # The effective weight changed by exactly s B A, up to the chain dtype's rounding.
        return R + r, 0.0, chain_B[:, R : R + r], chain_A[R : R + r]
    old_B, old_A = chain_B[:, :R].clone(), chain_A[:R].clone()
    # (the link is not rounded to a bf16 chain's dtype before the SVD: only its result is)
    B_new, A_new, discarded = compress_lora(torch.cat([old_B.float(), sB.float()], dim=1),
                                            torch.cat([old_A.float(), A.float()], dim=0), cap)
    chain_B.copy_(B_new)
    chain_A.copy_(A_new)
    # dW_eff = new chain - old chain, as one low-rank product [B_new | -old_B] [A_new; old_A].
    return cap, discarded, torch.cat([chain_B, -old_B], dim=1), torch.cat([chain_A, old_A], dim=0)


def chain_of_links(
    links: Sequence[tuple[torch.Tensor, torch.Tensor]], scale: float, capacity: int,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The factored chain a layer of chain capacity ``capacity`` holds after merging ``links``
    in order (each recompression redone exactly as training did it, without the base).

    Args:
        links: ``(B_t (m, r), A_t (r, n))`` per merged link, unscaled. scale: s.
        capacity: the layer's chain columns (``RacLoraConfig.chain_capacity``).
        dtype: the dtype training held the chain in (``RacLoraLinear.chain_dtype``).

    Returns:
        ``(B (m, R), A (R, n), discarded)``: the chain (scale folded into B) in fp32, its
        values those training held, R <= capacity, and the largest share of energy one
        recompression dropped.
    """
    if not links:
        raise ValueError("the chain has no merged links to export")
    m, n = links[0][0].shape[0], links[0][1].shape[1]
    chain_B, chain_A = torch.zeros(m, capacity, dtype=dtype), torch.zeros(capacity, n, dtype=dtype)
    R, worst = 0, 0.0
    for B, A in links:
        R, discarded, _, _ = append_to_chain(chain_B, chain_A, R, scale * B, A)
        worst = max(worst, discarded)
    return chain_B[:, :R].to(torch.float32, copy=True), chain_A[:R].to(torch.float32, copy=True), worst
