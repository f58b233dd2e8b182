"""The record of merged links on disk: written once, read back on demand, never held twice."""

from __future__ import annotations

import os

import pytest
import torch

from raclora_dist.checkpoint.folder import load_checkpoint, save_checkpoint
from raclora_dist.checkpoint.link_files import LinkStore, StoredLink, link_name
from raclora_dist.core import ChainState


def factors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a.q": torch.randn(4, 2, generator=g), "a.v": torch.randn(2, 6, generator=g)}


def test_spill_writes_each_link_once_and_reads_it_back(tmp_path):
    store = LinkStore(tmp_path / "chain")
    store[0], store[1] = factors(0), factors(1)
    assert store.in_ram == [0, 1]
    store.spill()
    assert store.in_ram == [] and list(store) == [0, 1]
    path = tmp_path / "chain" / link_name(0)
    mtime = path.stat().st_mtime_ns
    store[2] = factors(2)
    store.spill()  # only the new link is written
    assert path.stat().st_mtime_ns == mtime
    for t in range(3):
        got = store[t]
        assert isinstance(got, StoredLink) and got.digest[0] == (tmp_path / "chain" / link_name(t)).stat().st_size
        assert set(got) == {"a.q", "a.v"} and all(got[k].equal(v) for k, v in factors(t).items())


def test_other_ranks_keep_no_record(tmp_path):
    store = LinkStore(None)
    store[0] = factors(0)
    store.spill()
    assert store.in_ram == [] and list(store) == [0]
    with pytest.raises(KeyError, match="kept by rank 0 only"):
        store[0]


def test_checkpoints_hard_link_the_store_and_resume_reads_the_files(tmp_path):
    run = tmp_path / "run"
    store = LinkStore(run / "checkpoints" / "chain")
    state = ChainState(merged=[0], factors=store)
    store[0] = factors(0)
    store.spill()
    first = save_checkpoint(run, state, {"next_link": 1, "global_step": 1}, keep=5, write_state=lambda _: None)
    state.merged.append(1)
    store[1] = factors(1)
    store.spill()
    second = save_checkpoint(run, state, {"next_link": 2, "global_step": 2}, keep=5, write_state=lambda _: None)
    f0 = [ckpt / "links" / link_name(0) for ckpt in (first, second)]
    assert os.stat(f0[0]).st_ino == os.stat(f0[1]).st_ino == os.stat(store[0].path).st_ino
    ckpt = load_checkpoint(second)
    assert ckpt.chain.merged == [0, 1] and all(isinstance(ckpt.chain.factors[t], StoredLink) for t in (0, 1))
    assert all(ckpt.chain.factors[1][k].equal(v) for k, v in factors(1).items())
    # a resumed run's store takes the checkpoint's files over (linked, not rewritten)
    resumed = LinkStore(tmp_path / "elsewhere", ckpt.chain.factors)
    assert resumed.in_ram == [] and os.stat(resumed[1].path).st_ino == os.stat(second / "links" / link_name(1)).st_ino
