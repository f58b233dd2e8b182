"""4-bit (NF4) bases sharded by FSDP2 and ZeRO-3, 2 gloo processes, real bitsandbytes.

The packed codes are what the engines shard; bitsandbytes keeps the quantization state on
the module. A lost or stale state under sharding corrupts the model silently, so each run
is compared with the one-process run: the forward before training (initial eval loss), the
losses of every step (they depend on the 4-bit weights every merge rewrote), the trained
chain and the landed fractions.
"""

from __future__ import annotations

import pytest
import torch

from raclora_dist.checkpoint.folder import chain_tensors, find_latest
from tests.distributed.engines import ENGINES, assert_chains_close, losses, meta, train
from tests.helpers import faults, read_jsonl, run_cli, tiny_config, write_config

pytestmark = pytest.mark.slow

MODES = {
    # the exact chain: uncapped, held in fp32
    "factored": ["raclora.merge_mode=factored", "raclora.chain_budget=null", "raclora.chain_dtype=float32"],
    # the default: these layers keep one link's r columns, recompressed at every later merge, in
    # bf16 (chain_dtype auto on a 4-bit base): sharded and gathered in bf16 as one process holds it
    "capped": ["raclora.merge_mode=factored"],
    "master": ["raclora.merge_mode=into_base", "raclora.master_weights=cpu"],
    # also the other storage: codes packed in float32 elements, sharded without casts in fp32
    "in_place": ["raclora.merge_mode=into_base", "raclora.stochastic_rounding=true",
                 "model.quantization.storage_dtype=float32"],
}


def records(run, kind):
    return [r for r in read_jsonl(run / "metrics.jsonl") if r["type"] == kind]


@pytest.fixture(scope="module")
def qsetup(tmp_path_factory, small_data):
    d = tmp_path_factory.mktemp("qdist")
    cfg = write_config(d / "c.yaml", tiny_config(small_data, d / "unused", model={"quantization": "nf4"}))
    singles = {}
    for mode, args in MODES.items():
        singles[mode] = d / f"single-{mode}"
        proc = run_cli("train", str(cfg), f"run.dir={singles[mode]}", *args)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return d, cfg, singles


HSDP = ["distributed.strategy=fsdp2", "distributed.workers=4", "distributed.replicas=2"]
ENGINE_ARGS = {**ENGINES, "hsdp": HSDP}


@pytest.mark.parametrize("engine,mode", [(e, m) for e in ("fsdp2", "zero3") for m in MODES]
                         # HSDP, 2 replicas x 2 shards: a master's row chunks gathered over a
                         # replica's ranks (not all 4), the chain's recompression on each replica
                         + [("hsdp", "master"), ("hsdp", "capped")])
def test_sharded_4bit_run_equals_the_one_process_run(engine, mode, qsetup):
    d, cfg, singles = qsetup
    single, run = singles[mode], d / f"{engine}-{mode}"
    proc = train(cfg, run, *ENGINE_ARGS[engine], *MODES[mode])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert meta(run)["merged"] == [0, 1, 2] and meta(run)["world_size"] == (4 if engine == "hsdp" else 2)
    # the sharded 4-bit forward equals the unsharded one before any training
    assert records(run, "eval")[0]["eval_loss"] == pytest.approx(records(single, "eval")[0]["eval_loss"], abs=1e-6)
    assert torch.allclose(torch.tensor(losses(run)), torch.tensor(losses(single)), atol=1e-5)
    assert_chains_close(single, run)
    got, want = records(run, "link"), records(single, "link")
    assert [r["eval_loss"] for r in got] == pytest.approx([r["eval_loss"] for r in want], abs=1e-5)
    assert [r["landed_fraction"] for r in got] == pytest.approx([r["landed_fraction"] for r in want], abs=1e-3)
    if mode == "factored":
        assert all(r["landed_fraction"] == pytest.approx(1, abs=1e-5) for r in got)
    if mode == "capped":  # recompressed on the gathered chain, as one process does
        assert all(r["discarded_energy"] > 0 for r in got[1:])
        assert [r["discarded_energy"] for r in got] == pytest.approx([r["discarded_energy"] for r in want], abs=1e-4)


def test_sharded_master_copy_run_resumes_after_a_crash(qsetup):
    """The master copy is not checkpointed: a resumed run rebuilds it from the saved base by
    replaying the links, then shards it again; the run ends where the uninterrupted one does."""
    d, cfg, singles = qsetup
    run = d / "fsdp2-master-crash"
    args = (*ENGINES["fsdp2"], *MODES["master"])
    assert train(cfg, run, *args, faults(crash_at_step=5)).returncode != 0
    assert find_latest(run).name == "link-00001-step-0000003"
    proc = train(cfg, run, *args, resume=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_chains_close(singles["master"], run)
    assert losses(run) == pytest.approx(losses(singles["master"]), abs=1e-5)


def test_the_default_bf16_chain_resumes_bitwise_after_a_crash(qsetup):
    """NF4's default chain (capped, held in bf16): a one-process run that crashed mid link 2
    rebuilds the recompressed bf16 chain by replaying links 0-1 and ends bitwise where the
    uninterrupted run ends (any difference in the replayed chain changes every later loss)."""
    d, cfg, singles = qsetup
    run = d / "single-capped-crash"
    args = (f"run.dir={run}", *MODES["capped"])
    # crashed at step 7 (link 2's second step): the resume replays links 0 and 1, and link 1's
    # merge recompressed the chain (held in fp32 during the replay and cast after, it differs)
    crashed = run_cli("train", str(cfg), *args, faults(crash_at_step=7))
    assert crashed.returncode == 17, crashed.stderr[-3000:]
    assert find_latest(run).name == "link-00002-step-0000006"
    resumed = run_cli("train", str(cfg), *args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = chain_tensors(find_latest(singles["capped"])), chain_tensors(find_latest(run))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    assert losses(run) == losses(singles["capped"])
    assert [r["landed_fraction"] for r in records(run, "link")] == \
        [r["landed_fraction"] for r in records(singles["capped"], "link")]


def test_bf16_mixed_precision_leaves_the_packed_codes_alone(qsetup):
    """FSDP2 casts floating-point parameters to bf16 for the forward; the codes are stored as
    uint8 (auto), so they reach bitsandbytes unchanged and the run tracks the fp32 one."""
    d, cfg, singles = qsetup
    run = d / "fsdp2-bf16"
    proc = train(cfg, run, *ENGINES["fsdp2"], *MODES["factored"], "distributed.mixed_precision=bf16")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert records(run, "eval")[0]["eval_loss"] == pytest.approx(records(singles["factored"], "eval")[0]["eval_loss"], abs=5e-3)
    assert losses(run) == pytest.approx(losses(singles["factored"]), abs=5e-3)
    assert losses(run) != losses(singles["factored"])  # it really ran in bf16
