"""Export math: T merged links of rank r are one LoRA of rank T*r.

``B_cat = [s B_1 | ... | s B_T]`` (m, T r), ``A_cat = [A_1; ...; A_T]`` (T r, n), so
``B_cat @ A_cat = sum_t s B_t A_t``. The scale is folded into ``B_cat``; an exported PEFT
adapter therefore uses ``lora_alpha = r_total`` (PEFT scale 1).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

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


def chain_of_links(
    links: Sequence[tuple[torch.Tensor, torch.Tensor]], scale: float, capacity: int
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The factored chain a layer of chain capacity ``capacity`` holds after merging ``links``
    in order (each recompression redone exactly as training did it, without the base).

    Args:
        links: ``(B_t (m, r), A_t (r, n))`` per merged link, unscaled. scale: s.
        capacity: the layer's chain columns (``RacLoraConfig.chain_capacity``).

    Returns:
        ``(B (m, R), A (R, n), discarded)``: the chain (scale folded into B), R <= capacity,
        and the largest share of energy one recompression dropped.
    """
    from raclora_dist.core.layer import append_to_chain

    if not links:
        raise ValueError("the chain has no merged links to export")
    m, n = links[0][0].shape[0], links[0][1].shape[1]
    dtype = links[0][1].dtype
    chain_B, chain_A = torch.zeros(m, capacity, dtype=dtype), torch.zeros(capacity, n, dtype=dtype)
    R, worst = 0, 0.0
    for B, A in links:
        R, discarded, _, _ = append_to_chain(chain_B, chain_A, R, scale * B, A)
        worst = max(worst, discarded)
    return chain_B[:, :R].clone(), chain_A[:R].clone(), worst
