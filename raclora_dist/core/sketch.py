"""Random sketches: a pure function of ``(seed, link, module name)``, drawn on CPU.

Every rank calls :func:`sample_sketch` with the same arguments and gets the same bits, with
no communication. The chain's convergence proof needs each link's sketch drawn afresh and
independently of earlier links, so the link index is part of the key: no sketch is reused.
"""

from __future__ import annotations

import hashlib
import math

import torch

SKETCH_DISTS: tuple[str, ...] = ("orthogonal", "gaussian", "kaiming_uniform")


def sketch_seed(seed: int, link: int, name: str) -> int:
    """Derives a 63-bit generator seed from ``(seed, link, name)``.

    A cryptographic hash (rather than e.g. ``seed + link``) keeps keys of neighbouring links
    and modules from producing correlated streams.
    """
    digest = hashlib.blake2b(f"{seed}\x1f{link}\x1f{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def sample_sketch(
    dist: str, rank: int, dim: int, *, seed: int, link: int, name: str
) -> torch.Tensor:
    """Draws one sketch with orthonormal-ish rows.

    Args:
        dist: ``orthogonal`` (QR of a Gaussian, sign-fixed: rows exactly orthonormal),
            ``gaussian`` (entries N(0, 1/dim)) or ``kaiming_uniform`` (PEFT's default
            ``lora_A`` init, U(-1/sqrt(dim), 1/sqrt(dim))).
        rank: r, the number of rows.
        dim: d, the sketched side's dimension (n for a right sketch, m for a left one).
        seed, link, name: the key; equal keys give bitwise-equal sketches.

    Returns:
        A float32 CPU tensor of shape ``(rank, dim)``. A right sketch uses it as ``A``;
        a left sketch uses its transpose as ``B`` (shape ``(dim, rank)``).

    Raises:
        ValueError: for an unknown distribution, or ``rank > dim`` with ``orthogonal``.
    """
    gen = torch.Generator(device="cpu").manual_seed(sketch_seed(seed, link, name))
    if dist == "orthogonal":
        if rank > dim:
            raise ValueError(f"orthogonal sketch needs rank <= dim, got rank={rank}, dim={dim}")
        g = torch.randn(dim, rank, generator=gen, dtype=torch.float64)
        q, r = torch.linalg.qr(g)  # q: (dim, rank) with orthonormal columns
        # QR is unique only up to column signs; fixing sign(diag(r)) > 0 makes the draw
        # Haar-distributed and independent of the LAPACK build.
        signs = torch.sign(torch.diagonal(r))
        signs[signs == 0] = 1.0
        return (q * signs).T.contiguous().to(torch.float32)
    if dist == "gaussian":
        return torch.randn(rank, dim, generator=gen, dtype=torch.float32) / math.sqrt(dim)
    if dist == "kaiming_uniform":
        bound = 1.0 / math.sqrt(dim)
        return (torch.rand(rank, dim, generator=gen, dtype=torch.float32) * 2 - 1) * bound
    raise ValueError(f"unknown sketch distribution {dist!r}; allowed: {', '.join(SKETCH_DISTS)}")


def tensor_fingerprint(t: torch.Tensor) -> int:
    """A 62-bit integer hash of a tensor's bytes (fits int64 for all-reduce max/min)."""
    data = t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    digest = hashlib.blake2b(data, digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 62) - 1)
