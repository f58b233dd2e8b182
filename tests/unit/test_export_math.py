"""The chain as one LoRA of rank T*r, and its SVD compression."""

import torch

from raclora_dist.core import compress_lora, concat_links


def test_concatenated_links_equal_the_sum_of_updates():
    torch.manual_seed(0)
    links = [(torch.randn(6, 2), torch.randn(2, 9)) for _ in range(5)]
    B, A = concat_links(links, scale=0.5)
    assert B.shape == (6, 10) and A.shape == (10, 9)
    assert torch.allclose(B @ A, 0.5 * sum(b @ a for b, a in links), atol=1e-5)


def test_compression_keeps_the_top_singular_values_and_reports_the_rest():
    torch.manual_seed(0)
    B, A = torch.randn(30, 8, dtype=torch.float64), torch.randn(8, 20, dtype=torch.float64)
    Bk, Ak, discarded = compress_lora(B, A, 3)
    S = torch.linalg.svdvals(B @ A)
    U, _, Vh = torch.linalg.svd(B @ A)
    assert torch.allclose(Bk @ Ak, (U[:, :3] * S[:3]) @ Vh[:3], atol=1e-8)
    assert abs(discarded - float((S[3:] ** 2).sum() / (S**2).sum())) < 1e-10
    B2, A2, d2 = compress_lora(B, A, 8)  # no truncation
    assert d2 == 0.0 and torch.allclose(B2 @ A2, B @ A)
