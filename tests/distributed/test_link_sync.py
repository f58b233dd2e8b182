"""Link-sync (``distributed.sync: link``): RAC-LoRA's federated form under torchrun, 2 or 4
gloo processes on CPU, through `raclora train`. Each group trains a whole link alone; one
all-reduce averages the factors at the boundary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from raclora_dist.checkpoint.folder import find_latest
from tests.distributed.engines import assert_chains_close, chain, losses, meta, train, two_nodes
from tests.helpers import faults, read_jsonl, run_cli, tiny_config, write_config

pytestmark = pytest.mark.slow

LINK = ["distributed.strategy=ddp", "distributed.sync=link"]
FACTOR_BYTES = 768 * 4  # the tiny model's 8 layers, rank 2: 768 fp32 factor entries


def records(run: Path, kind: str) -> list[dict]:
    rows = read_jsonl(run / "metrics.jsonl")
    return [r for r in rows if r["type"] == kind] if kind != "link" else [r for r in rows if "merged" in r]


@pytest.fixture(scope="module")
def same_rows(tmp_path_factory) -> Path:
    """A corpus whose packed 32-token rows are all identical (15 bytes + end of text = 16)."""
    path = tmp_path_factory.mktemp("same") / "same.jsonl"
    path.write_text("".join(json.dumps({"text": "abcdefghijklmno"}) + "\n" for _ in range(300)))
    return path


@pytest.mark.parametrize("base", ["fp32", "nf4"])
def test_identical_data_on_every_worker_equals_the_one_process_chain(base, same_rows, tmp_path):
    """Both workers see the same rows, so each trains the one-process factor alone; the
    average is that factor, and the chain is the one-process chain, with no communication
    between boundaries. Also over a 4-bit base (merged factored)."""
    model = {"quantization": "nf4"} if base == "nf4" else {}
    cfg = write_config(tmp_path / "c.yaml", tiny_config(same_rows, tmp_path / "unused", model=model))
    single, link = tmp_path / "single", tmp_path / "link"
    assert run_cli("train", str(cfg), f"run.dir={single}").returncode == 0
    proc = train(cfg, link, *LINK)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert meta(link)["merged"] == [0, 1, 2] and meta(link)["fingerprints"] == meta(single)["fingerprints"]
    assert_chains_close(single, link)
    assert losses(link) == pytest.approx(losses(single), abs=1e-5)
    # Nothing crosses workers during a link; the boundary all-reduces the factors (plus the
    # guard's flag and the landed statistics), and a link adds its fingerprint check.
    assert {r["comm_bytes"] for r in records(link, "step")} == {0}
    for r in records(link, "link"):
        assert FACTOR_BYTES <= r["comm_bytes_boundary"] < FACTOR_BYTES + 100
        assert r["comm_bytes_link"] - r["comm_bytes_boundary"] < 200


def test_sync_rounds_inside_a_link_average_the_factors_each_round(same_rows, tmp_path):
    """``link_sync_rounds: 3`` with K = 3: the groups sync after steps 1 and 2 of every link (the
    third round is the boundary). On identical data every group holds the one-process factor,
    so a plain outer step (lr 1, no momentum) leaves it as it is: the run is the one-process
    run, and the synced steps carry the factors' all-reduce (plus the guard's flag)."""
    cfg = write_config(tmp_path / "c.yaml", tiny_config(same_rows, tmp_path / "unused"))
    single, link = tmp_path / "single", tmp_path / "link"
    assert run_cli("train", str(cfg), f"run.dir={single}").returncode == 0
    proc = train(cfg, link, *LINK, "distributed.link_sync_rounds=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_chains_close(single, link)
    assert losses(link) == pytest.approx(losses(single), abs=1e-5)
    sent = [r["comm_bytes"] for r in records(link, "step")]
    assert all(FACTOR_BYTES <= b < FACTOR_BYTES + 16 for i, b in enumerate(sent) if i % 3 != 2), sent
    assert [b for i, b in enumerate(sent) if i % 3 == 2] == [0, 0, 0]


@pytest.mark.parametrize("workers,groups,launcher", [(2, None, "torchrun"), (4, 2, "torchrun"), (2, None, "ray")])
def test_the_merged_link_is_the_mean_of_the_groups_separately_trained_links(workers, groups, launcher, small_data,
                                                                             tmp_path):
    """Different shards: each group's factor is its own; the merged link (the chain's record,
    which replay and export use) is their mean, exactly up to float rounding. With 2 groups of
    2, DDP keeps the factor equal inside each group every step. Under torchrun and Ray Train."""
    cfg = write_config(tmp_path / "c.yaml", tiny_config(small_data, tmp_path / "unused"))
    run, dump = tmp_path / "run", tmp_path / "dump"
    spec = f"run.callbacks=[{{class: 'tests.probes:DumpFactors', args: {{out: '{dump}'}}}}]"
    extra = [f"distributed.sync_groups={groups}"] if groups else []
    extra += ["ray.enabled=true"] if launcher == "ray" else []
    proc = train(cfg, run, *LINK, f"distributed.workers={workers}", *extra, spec)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stored = chain(run)
    size = workers // (groups or workers)
    for link in range(3):
        per_rank = [load_file(dump / f"rank{r}-link{link}.safetensors") for r in range(workers)]
        for name in per_rank[0]:
            parts = [f[name] for f in per_rank]
            leaders = parts[::size]  # one per group
            assert all(torch.equal(parts[r], leaders[r // size]) for r in range(workers))  # equal inside a group
            assert not torch.allclose(leaders[0], leaders[1], atol=1e-6)  # the groups trained apart
            torch.testing.assert_close(stored[f"link.{link}.{name}"], torch.stack(leaders).mean(0), rtol=0, atol=1e-7)
    steps = records(run, "step")
    # Inside a group of 2, DDP all-reduces the gradients each step; a group of 1 sends nothing.
    assert {r["comm_bytes"] for r in steps} == ({FACTOR_BYTES + 8} if size == 2 else {0})


def test_a_crash_mid_link_resumes_bitwise(small_data, tmp_path):
    """Checkpoints mid-link keep every rank's own factors and optimizer state (they differ
    until the boundary): the resumed run ends bitwise where the uninterrupted one ends."""
    cfg = write_config(tmp_path / "c.yaml", tiny_config(small_data, tmp_path / "unused", checkpoint={"every_steps": 2}))
    whole, crashed = tmp_path / "whole", tmp_path / "crashed"
    assert train(cfg, whole, *LINK).returncode == 0
    proc = train(cfg, crashed, *LINK, faults(crash_at_step=5))
    assert proc.returncode != 0
    latest = find_latest(crashed)
    assert latest.name == "link-00001-step-0000004"  # 1 step into link 1: the ranks' factors differ
    # A different group layout cannot take over the ranks' factors mid-link: a clear error.
    _apart_then_resumed(cfg, whole, crashed, [latest / f"rank{r}.pt" for r in range(2)], LINK,
                        [*LINK, "distributed.workers=1", "distributed.strategy=single"], "distributed.sync: link")


def _apart_then_resumed(cfg, whole, crashed, saved_files, args, other_layout, refusal) -> None:
    """The groups' saved factors differ mid-link and carry Adam's moments so far; resuming under
    ``other_layout`` is refused (exit 2, ``refusal`` in the message); resuming under ``args``
    ends bitwise where the uninterrupted run ``whole`` ended."""
    saved = [torch.load(f, weights_only=True) for f in saved_files]
    name = next(iter(saved[0]["factors"]))
    assert not torch.equal(saved[0]["factors"][name], saved[1]["factors"][name])
    assert saved[0]["optimizer"]["state"]
    proc = train(cfg, crashed, *other_layout, resume=True)
    assert proc.returncode == 2 and refusal in proc.stderr, proc.stderr[-3000:]
    proc = train(cfg, crashed, *args, resume=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = chain(whole), chain(crashed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert losses(crashed) == losses(whole)


FSDP2_LINK = ["distributed.strategy=fsdp2", "distributed.sync=link", "distributed.sync_groups=2"]


def test_link_sync_over_fsdp2_groups_on_two_nodes_averages_shard_by_shard(small_data, tmp_path):
    """Two torchrun "nodes" of 2 workers, each node a group that shards the model over its own
    ranks (FSDP2) and trains its own link: the merged link is the mean of the groups' factors,
    the run equals DDP link-sync with the same groups, and nothing crosses nodes during a link;
    at the boundary each rank all-reduces only its shard with the rank that holds the same
    rows in the other group."""
    cfg = write_config(tmp_path / "c.yaml", tiny_config(small_data, tmp_path / "unused"))
    dump = tmp_path / "dump"
    spec = f"run.callbacks=[{{class: 'tests.probes:DumpFactors', args: {{out: '{dump}'}}}}]"
    run, outs = two_nodes(cfg, lambda a: tmp_path / f"fsdp2-{a}", *FSDP2_LINK, spec, per_node=2)
    assert all(rc == 0 for rc, _, _ in outs), [err[-2000:] for _, _, err in outs]
    stored = chain(run)
    for link in range(3):
        per_rank = [load_file(dump / f"rank{r}-link{link}.safetensors") for r in range(4)]
        for name in per_rank[0]:
            parts = [f[name] for f in per_rank]
            assert torch.equal(parts[0], parts[1]) and torch.equal(parts[2], parts[3])  # one factor per group
            assert not torch.allclose(parts[0], parts[2], atol=1e-6)  # the groups trained apart
            torch.testing.assert_close(stored[f"link.{link}.{name}"], (parts[0] + parts[2]) / 2, rtol=0, atol=1e-7)
    ddp = tmp_path / "ddp"
    assert train(cfg, ddp, *LINK, "distributed.workers=4", "distributed.sync_groups=2").returncode == 0
    assert_chains_close(ddp, run)
    assert losses(run) == pytest.approx(losses(ddp), abs=1e-5)
    assert {r["comm_bytes_across"] for r in records(run, "step")} == {0}
    assert all(r["comm_bytes"] > 10 * FACTOR_BYTES for r in records(run, "step"))  # the group's gathers
    for r in records(run, "link"):
        # this rank's half of the factors, plus the guard's flag and the landed statistics
        assert FACTOR_BYTES // 2 <= r["comm_bytes_boundary_across"] < FACTOR_BYTES // 2 + 100
        assert r["comm_bytes_link_across"] - r["comm_bytes_boundary_across"] < 200  # the fingerprint check


def test_link_sync_over_fsdp2_groups_resumes_mid_link_bitwise(small_data, tmp_path):
    """Mid-link, each group's first rank keeps its group's whole factors and optimizer state
    (``group<G>.pt``); the resumed run ends bitwise where the uninterrupted one ends."""
    cfg = write_config(tmp_path / "c.yaml", tiny_config(small_data, tmp_path / "unused", checkpoint={"every_steps": 2}))
    whole, crashed = tmp_path / "whole", tmp_path / "crashed"
    args = [*FSDP2_LINK, "distributed.workers=4"]
    assert train(cfg, whole, *args).returncode == 0
    assert train(cfg, crashed, *args, faults(crash_at_step=5)).returncode != 0
    latest = find_latest(crashed)
    assert latest.name == "link-00001-step-0000004"
    _apart_then_resumed(cfg, whole, crashed, [latest / f"group{g}.pt" for g in range(2)], args,
                        [*LINK, "distributed.workers=4", "distributed.sync_groups=2"], "with fsdp2, 4 workers")
