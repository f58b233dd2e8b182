"""HSDP (``distributed.replicas``): FSDP2 over a 2-D device mesh, 2 replica groups x 2 shards
(4 gloo processes on CPU), through `raclora train`, against the one-process run on the same
global batches; resumed as HSDP, as full-shard over every worker and on fewer workers.

Tolerances as in test_backends.py (fp32: the gradient is a mean of four quarter-batch means)."""

from __future__ import annotations

import json

import pytest

from raclora_dist.checkpoint.folder import find_latest
from tests.distributed.engines import assert_chains_close, eval_losses, losses, meta, train
from tests.helpers import faults, read_jsonl, run_cli, tiny_config, write_config

pytestmark = pytest.mark.slow

HSDP = ["distributed.strategy=fsdp2", "distributed.workers=4", "distributed.replicas=2"]


@pytest.fixture(scope="module")
def hsetup(tmp_path_factory, small_data):
    d = tmp_path_factory.mktemp("hsdp")
    cfg = write_config(d / "c.yaml", tiny_config(small_data, d / "unused"))
    single = d / "single"
    proc = run_cli("train", str(cfg), f"run.dir={single}")
    assert proc.returncode == 0, proc.stderr
    return d, cfg, single


def landed(run) -> list[float]:
    return [r["landed_fraction"] for r in read_jsonl(run / "metrics.jsonl") if r["type"] == "link"]


def test_hsdp_equals_one_process(hsetup):
    d, cfg, single = hsetup
    run, probe = d / "hsdp", d / "mesh.json"
    proc = train(cfg, run, *HSDP, f"run.callbacks=[{{class: 'tests.probes:MeshProbe', args: {{out: '{probe}'}}}}]")
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The factors really are HSDP's DTensors: replicated over 2 groups, sharded over 2 ranks each.
    assert json.loads(probe.read_text()) == {"mesh": [2, 2], "placements": ["Replicate", "Shard"]}
    assert meta(run)["merged"] == [0, 1, 2] and (meta(run)["world_size"], meta(run)["replicas"]) == (4, 2)
    assert meta(run)["fingerprints"] == meta(single)["fingerprints"]  # verified over all 4 ranks
    assert_chains_close(single, run)
    assert losses(run) == pytest.approx(losses(single), abs=1e-5)
    assert eval_losses(run) == pytest.approx(eval_losses(single), rel=1e-6)
    # Each replica merges the same rows; one replica's count: a fraction, not twice one.
    assert landed(run) == pytest.approx(landed(single), abs=1e-6)


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
    d, cfg, _ = hsetup
    for extra, words in [(["distributed.strategy=deepspeed", "distributed.workers=4"], "hpZ and MiCS"),
                         (["distributed.strategy=fsdp2", "distributed.workers=3"], "must divide workers")]:
        proc = run_cli("train", str(cfg), f"run.dir={tmp_path / 'x'}", *extra, "distributed.replicas=2")
        assert proc.returncode == 2 and "distributed: Value error, replicas" in proc.stderr, proc.stderr
        assert words in proc.stderr, proc.stderr
