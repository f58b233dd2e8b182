"""HSDP (``distributed.replicas``): FSDP2 over a 2-D device mesh, 2 replica groups x 2 shards
(4 gloo processes on CPU), through `raclora train`, against the one-process run on the same
global batches; resumed as HSDP, as full-shard over every worker and on fewer workers.

Tolerances as in test_backends.py (fp32: the gradient is a mean of four quarter-batch means)."""

from __future__ import annotations

import json

import pytest

from raclora_dist.checkpoint.folder import find_latest
from tests.distributed.engines import (
    assert_chains_close,
    eval_losses,
    losses,
    meta,
    train,
    two_nodes,
)
from tests.helpers import faults, read_jsonl, run_cli

pytestmark = pytest.mark.slow

MESH = ["distributed.strategy=fsdp2", "distributed.replicas=2"]  # two_nodes sets the workers
HSDP = [*MESH, "distributed.workers=4"]


@pytest.fixture(scope="module")
def hsetup(tmp_path_factory, one_process_run):
    return tmp_path_factory.mktemp("hsdp"), *one_process_run


def landed(run) -> list[float]:
    return [r["landed_fraction"] for r in read_jsonl(run / "metrics.jsonl") if r["type"] == "link"]


def steps(run) -> list[dict]:
    return [r for r in read_jsonl(run / "metrics.jsonl") if r["type"] == "step"]


def test_hsdp_across_two_nodes_equals_one_process_and_keeps_the_gathers_inside_a_node(hsetup):
    """Two torchrun "nodes" of 2 workers (each node a replica group), against one process and
    against FSDP2 sharded over all 4 (full shard): the same chain, and per step only the
    gradients' all-reduce (a quarter of the factors' bytes per rank here) and the logged loss
    cross nodes, where full shard sends every gather and reduction across."""
    d, cfg, single = hsetup
    probe = d / "mesh.json"
    spy = f"run.callbacks=[{{class: 'tests.probes:MeshProbe', args: {{out: '{probe}'}}}}]"
    run, outs = two_nodes(cfg, lambda a: d / f"hsdp-{a}", *MESH, spy, per_node=2)
    assert all(rc == 0 for rc, _, _ in outs), [err[-2000:] for _, _, err in outs]
    # The factors really are HSDP's DTensors: replicated over 2 groups, sharded over 2 ranks each.
    assert json.loads(probe.read_text()) == {"mesh": [2, 2], "placements": ["Replicate", "Shard"]}
    assert meta(run)["merged"] == [0, 1, 2] and (meta(run)["world_size"], meta(run)["replicas"]) == (4, 2)
    assert meta(run)["fingerprints"] == meta(single)["fingerprints"]  # verified over all 4 ranks
    assert_chains_close(single, run)
    assert losses(run) == pytest.approx(losses(single), abs=1e-5)
    assert eval_losses(run) == pytest.approx(eval_losses(single), rel=1e-6)
    # Each replica merges the same rows; one replica's count: a fraction, not twice one.
    assert landed(run) == pytest.approx(landed(single), abs=1e-6)
    # The vocabulary split stays inside a replica group too.
    assert "by vocabulary rows across 2 ranks" in outs[0][1] + outs[1][1]

    full, outs = two_nodes(cfg, lambda a: d / f"full-{a}", MESH[0], per_node=2)
    assert all(rc == 0 for rc, _, _ in outs), [err[-2000:] for _, _, err in outs]
    assert_chains_close(single, full)
    factor_bytes = 768 * 4  # the tiny model's 8 layers, rank 2
    for h, f in zip(steps(run), steps(full), strict=False):
        assert h["comm_bytes_across"] == factor_bytes // 2 + 8  # this rank's gradient shard, the loss
        assert f["comm_bytes_across"] == f["comm_bytes"] > 40 * h["comm_bytes_across"]
        assert h["comm_bytes"] > f["comm_bytes"]  # a group of 2 gathers larger shards than 4 do


@pytest.mark.parametrize("resume_as", [
    pytest.param(HSDP, id="hsdp"),
    pytest.param(["distributed.strategy=fsdp2", "distributed.workers=4"], id="full-shard"),
    pytest.param(["distributed.strategy=fsdp2", "distributed.workers=2"], id="one-replica-of-2"),
])
def test_hsdp_crash_resumes_as_hsdp_full_shard_or_fewer_workers(resume_as, hsetup):
    """A crash in link 2 (mid-link checkpoint after step 4: factors and Adam moments saved
    whole) resumes under any mesh: the chain replays onto the saved base, the optimizer state
    is a full state dict."""
    d, cfg, single = hsetup
    run = d / f"crash-{'-'.join(resume_as)}"
    extra = ["checkpoint.every_steps=2"]
    proc = train(cfg, run, *HSDP, *extra, faults(crash_at_step=5))
    assert proc.returncode != 0
    assert find_latest(run).name == "link-00001-step-0000004"
    proc = train(cfg, run, *resume_as, *extra, resume=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert meta(run)["merged"] == [0, 1, 2]
    assert_chains_close(single, run)
    assert losses(run) == pytest.approx(losses(single), abs=1e-5)


def test_replicas_is_a_config_error_outside_fsdp2(hsetup, tmp_path):
    _d, cfg, _ = hsetup
    for extra, words in [(["distributed.strategy=deepspeed", "distributed.workers=4"], "hpZ and MiCS"),
                         (["distributed.strategy=fsdp2", "distributed.workers=3"], "must divide workers")]:
        proc = run_cli("train", str(cfg), f"run.dir={tmp_path / 'x'}", *extra, "distributed.replicas=2")
        assert proc.returncode == 2 and "distributed: Value error, replicas" in proc.stderr, proc.stderr
        assert words in proc.stderr, proc.stderr
