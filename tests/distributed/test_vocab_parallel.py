"""The vocabulary-parallel embedding and head on 2 gloo processes, each with tokens of its
own, against the plain modules holding the whole matrix."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from raclora_dist.backends.vocab_parallel import VocabParallelEmbedding, VocabParallelHead, vocab_rows

V, H, B, T = 37, 8, 2, 5  # 37 rows over 2 ranks: 19 and 18 (one padded row)


def _worker(rank: int, world: int, store: str, out: dict) -> None:
    # a file rendezvous: no free port to find (and race for)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        g = torch.Generator().manual_seed(0)
        emb, head = torch.randn(V, H, generator=g), torch.randn(V, H, generator=g)
        mine = torch.Generator().manual_seed(100 + rank)  # each rank its own tokens
        ids = torch.randint(0, V, (B, T), generator=mine)
        ids[0, 0] = V - 1  # the last row, on the short rank
        hidden = torch.randn(B, T, H, generator=mine, dtype=torch.float64).float().requires_grad_()
        upstream = torch.randn(B, T, V, generator=mine)

        got_emb = VocabParallelEmbedding(emb, rank, world)(ids)
        out[f"emb_equal{rank}"] = torch.equal(got_emb, F.embedding(ids, emb))

        split = VocabParallelHead(head, rank, world)
        saved: list[tuple[int, ...]] = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
            logits = split(hidden)
        out[f"saved{rank}"] = saved
        (logits * upstream).sum().backward()
        got_grad = hidden.grad.clone()
        hidden.grad = None
        want = hidden @ head.t()
        (want * upstream).sum().backward()
        out[f"logits_err{rank}"] = (logits - want).abs().max().item()
        out[f"grad_err{rank}"] = (got_grad - hidden.grad).abs().max().item()
        out[f"shape{rank}"] = tuple(logits.shape)
    finally:
        dist.destroy_process_group()


def test_embedding_and_head_split_by_rows_equal_the_whole_ones(tmp_path):
    assert vocab_rows(V, 0, 2) == (0, 19, 19) and vocab_rows(V, 1, 2) == (19, 37, 19)
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), out), nprocs=2, join=True)
    for rank in range(2):
        assert out[f"emb_equal{rank}"]  # one rank's row plus zeros: exact
        assert out[f"shape{rank}"] == (B, T, V)
        # the forward keeps only this rank's rows of the weight for the backward (no activation)
        assert out[f"saved{rank}"] == [(19, H)]
        assert out[f"logits_err{rank}"] == pytest.approx(0, abs=1e-5)
        assert out[f"grad_err{rank}"] == pytest.approx(0, abs=1e-5)
