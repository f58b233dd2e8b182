"""Every engine with 2 gloo processes on CPU, through `raclora train` (which starts torchrun),
compared with the one-process run on the same global batches.

Tolerance: fp32 throughout. With 2 ranks the gradient is the mean of two half-batch means
(a different summation order than one full-batch mean), so values agree to ~1e-7 relative
per step; Adam's first step divides by |g| and can amplify that near g ~ 0, so factors are
compared at rtol 1e-4 / atol 1e-6 (measured differences are ~1e-8) and losses at 1e-5.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from raclora_dist.checkpoint.folder import find_latest
from tests.distributed.engines import (
    ENGINES,
    assert_chains_close,
    eval_losses,
    losses,
    meta,
    processes_mentioning,
    shm_files,
    train,
    two_nodes,
)
from tests.helpers import as_on_a_terminal, faults, read_jsonl, run_cli, subprocess_env

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(tmp_path_factory, one_process_run):
    return tmp_path_factory.mktemp("dist"), *one_process_run


@pytest.mark.parametrize("engine", list(ENGINES))
def test_engine_matches_one_process_and_resumes_after_a_crash(engine, setup):
    d, cfg, single = setup
    run, units = d / engine, d / f"{engine}-units"
    probe = [f"run.callbacks=[{{class: 'tests.probes:CountUnits', args: {{out: '{units}'}}}}]"] if engine == "fsdp2" else []
    proc = train(cfg, run, *ENGINES[engine], *probe)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if engine == "fsdp2":  # fsdp_unit auto, a toy's blocks: the 2 blocks and the root
        assert int(units.read_text()) == 2 + 1
    # the sharding engines keep the untied embedding and head split by vocabulary rows
    split = "split model.embed_tokens and lm_head by vocabulary rows across 2 ranks" in proc.stdout
    assert split == (engine in ("fsdp2", "zero3")), proc.stdout[-2000:]
    # the whole model's count on every engine (rank 2 on q, v, up, down of 2 blocks), though a
    # ZeRO-3 rank holds none of it whole
    assert "training 8 layers, 768 trainable parameters per link" in proc.stdout + proc.stderr
    # torch's warnings that a user can do nothing about stay off the console (FSDP2's on a
    # view returned by the root; DeepSpeed's calls of collectives deprecated in torch 2.13)
    assert "returned a view tensor" not in proc.stderr and "FutureWarning" not in proc.stderr, proc.stderr[-3000:]
    # the trained chain equals the one-process chain, link by link (3 links merged)
    assert meta(run)["merged"] == [0, 1, 2] and meta(run)["world_size"] == 2
    assert_chains_close(single, run)
    assert torch.allclose(torch.tensor(losses(run)), torch.tensor(losses(single)), atol=1e-5)
    # each rank evaluated half of every eval batch; the reduced loss is the one-process loss
    assert eval_losses(run) == pytest.approx(eval_losses(single), rel=1e-6)
    # every rank held the one-process sketches: their all-reduced fingerprints were checked
    # at each link, and they equal the ones the single run stored
    assert meta(run)["fingerprints"] == meta(single)["fingerprints"]

    crashed = d / f"{engine}-crash"
    proc = train(cfg, crashed, *ENGINES[engine], faults(crash_at_step=5))
    assert proc.returncode != 0
    assert "raclora: error: rank 0: the worker died (exit code 17" in proc.stderr  # os._exit, no message of its own
    assert find_latest(crashed).name == "link-00001-step-0000003"
    proc = train(cfg, crashed, *ENGINES[engine], resume=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_chains_close(run, crashed, rtol=1e-6, atol=1e-8)  # ends where the uninterrupted run ends
    assert losses(crashed) == pytest.approx(losses(run), abs=1e-6)


def test_fsdp2_with_the_embedding_and_head_sharded_whole_matches_one_process(setup):
    """``distributed.vocab_parallel=false``: FSDP2 shards the embedding and head as units of
    their own and gathers each for its forward (the path of tied or non-standard modules).
    Also ``fsdp_unit=sublayer``: attention and MLP are units of their own inside each block."""
    d, cfg, single = setup
    run, units = d / "fsdp2-gathered-head", d / "fsdp2-gathered-head-units"
    probe = f"run.callbacks=[{{class: 'tests.probes:CountUnits', args: {{out: '{units}'}}}}]"
    proc = train(cfg, run, *ENGINES["fsdp2"], "distributed.vocab_parallel=false", "distributed.fsdp_unit=sublayer", probe)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "by vocabulary rows" not in proc.stdout
    # per block attention and MLP, the 2 blocks, the embedding and the head, the root
    assert int(units.read_text()) == 2 * 2 + 2 + 2 + 1
    assert_chains_close(single, run)
    assert torch.allclose(torch.tensor(losses(run)), torch.tensor(losses(single)), atol=1e-5)


def test_fsdp2_with_a_unit_per_linear_layer_matches_one_process_and_resumes(setup):
    """``distributed.fsdp_unit=linear``: each RAC-LoRA layer (with its base) is an FSDP2 unit of
    its own inside its block; the chain is the same, and a crash mid-link resumes to it."""
    d, cfg, single = setup
    run, units = d / "fsdp2-linear", d / "fsdp2-linear-units"
    proc = train(cfg, run, *ENGINES["fsdp2"], "distributed.fsdp_unit=linear", faults(crash_at_step=5))
    assert proc.returncode != 0
    probe = f"run.callbacks=[{{class: 'tests.probes:CountUnits', args: {{out: '{units}'}}}}]"
    proc = train(cfg, run, *ENGINES["fsdp2"], "distributed.fsdp_unit=linear", probe, resume=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # 2 blocks x 7 linear layers (4 of them RAC-LoRA), the 2 blocks, the root (embedding and head
    # are split by rows, not units)
    assert int(units.read_text()) == 2 * 7 + 2 + 1
    assert meta(run)["merged"] == [0, 1, 2]
    assert_chains_close(single, run)


def test_fsdp2_resumes_with_a_different_number_of_workers(setup):
    d, cfg, single = setup
    run = d / "fsdp2-2to1"
    assert train(cfg, run, *ENGINES["fsdp2"], faults(crash_at_step=5)).returncode != 0
    proc = train(cfg, run, *ENGINES["fsdp2"], "distributed.workers=1", resume=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert meta(run)["world_size"] == 1 and meta(run)["merged"] == [0, 1, 2]
    assert_chains_close(single, run)


def test_desynchronised_sketch_stops_the_run_naming_the_module(setup):
    """Also the plain torchrun launch: the worker count comes from WORLD_SIZE."""
    d, cfg, _ = setup
    run = d / "desync"
    before = shm_files()
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "raclora_dist",
         "train", str(cfg), f"run.dir={run}", *ENGINES["ddp"], faults(desync_rank=1)],
        capture_output=True, text=True, timeout=600, env=subprocess_env(OMP_NUM_THREADS="1"),
    )
    assert proc.returncode != 0
    assert "link 1: ranks hold different sketches for module 'model.layers.0.self_attn.q_proj'" in proc.stderr
    assert meta(run)["merged"] == [0] and meta(run)["world_size"] == 2  # link 0's checkpoint intact
    assert not processes_mentioning(str(run)) and shm_files() <= before


def test_eval_split_across_ranks_with_a_batch_smaller_than_the_world_equals_one_process(setup):
    """Batches of 2 over 91 eval sequences: the last holds 1 row, so rank 1 runs a stand-in
    row that counts for nothing (FSDP2 gathers in every forward: every rank must run it)."""
    d, cfg, _ = setup
    tail = ["raclora.links=1", "raclora.steps_per_link=1", "train.batch_size=2", "train.eval_batches=50"]
    single = d / "eval-single"
    assert run_cli("train", str(cfg), f"run.dir={single}", *tail).returncode == 0
    run, rows = d / "eval-fsdp2", d / "eval-rows"
    probe = f"run.callbacks=[{{class: 'tests.probes:CountEvalRows', args: {{out: '{rows}'}}}}]"
    proc = train(cfg, run, *ENGINES["fsdp2"], *tail, probe)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(eval_losses(run)) == 2
    assert eval_losses(run) == pytest.approx(eval_losses(single), rel=1e-6)
    # each rank ran half the eval set's 91 rows (rank 1 one stand-in row more), not all of it
    counts = [json.loads((rows / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [c["evals"] for c in counts] == [1, 1]
    assert [c["rows"] for c in counts] == [46, 46]


@pytest.mark.parametrize("engine", ["ddp", "fsdp2"])
def test_nonfinite_factor_on_one_rank_merges_nothing_anywhere(engine, setup):
    d, cfg, _ = setup
    ref = d / f"nan-single-{engine}"
    proc = run_cli("train", str(cfg), f"run.dir={ref}", faults(nan_rank=0, nan_link=1))
    assert proc.returncode == 0, proc.stderr
    run = d / f"nan-{engine}"
    proc = train(cfg, run, *ENGINES[engine], faults(nan_rank=1, nan_link=1))
    assert proc.returncode == 0, proc.stderr[-3000:]
    links = [r for r in read_jsonl(run / "metrics.jsonl") if r["type"] == "link"]
    assert [r["merged"] for r in links] == [True, False, True]
    assert meta(run)["merged"] == [0, 2] and meta(run)["skipped"] == [1]
    # Had rank 1 merged its NaN, its weights (and every later gradient) would be NaN, and
    # link 2 would not match the one-process run that discarded link 1.
    assert_chains_close(ref, run)


@pytest.mark.parametrize("engine", ["fsdp2", "zero2"])
def test_bf16_mixed_precision_tracks_the_fp32_run(engine, setup):
    """bf16 parameters (fp32 reduction / master weights): the forward casts the fp32 sketch
    buffer to the factor's bf16; losses stay within bf16 rounding of the fp32 run's."""
    d, cfg, single = setup
    run = d / f"{engine}-bf16"
    proc = train(cfg, run, *ENGINES[engine], "distributed.mixed_precision=bf16")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert meta(run)["merged"] == [0, 1, 2]
    assert losses(run) == pytest.approx(losses(single), abs=5e-3)
    assert losses(run) != losses(single)  # it really ran in bf16


@pytest.mark.parametrize("engine", ["fsdp2", "zero2"])
def test_mid_link_checkpoint_resumes_with_optimizer_state(engine, setup):
    """checkpoint.every_steps=2: the crash after step 5 resumes from step 4, inside link 2,
    with the link's factors and the engine's (non-empty) Adam state restored."""
    d, cfg, single = setup
    run = d / f"{engine}-midlink"
    args = (*ENGINES[engine], "checkpoint.every_steps=2")
    assert train(cfg, run, *args, faults(crash_at_step=5)).returncode != 0
    assert find_latest(run).name == "link-00001-step-0000004"
    proc = train(cfg, run, *args, resume=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_chains_close(single, run)
    assert losses(run) == pytest.approx(losses(single), abs=1e-5)


@pytest.mark.parametrize("engine", ["ddp", "zero2"])
def test_activation_checkpointing_matches_one_process(engine, setup):
    """Recomputing each block in the backward changes memory only: same chain and losses as
    the plain one-process run. (FSDP2 and ZeRO-3 with checkpointing, on a 105 M model:
    tests/distributed/test_large_model.py.)"""
    d, cfg, single = setup
    run = d / f"{engine}-ckpt"
    proc = train(cfg, run, *ENGINES[engine], "train.activation_checkpointing=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert meta(run)["merged"] == [0, 1, 2]
    assert_chains_close(single, run)
    assert torch.allclose(torch.tensor(losses(run)), torch.tensor(losses(single)), atol=1e-5)


def test_fsdp2_cpu_offload_on_cpu_workers_is_a_config_error(setup):
    """torch's CPUOffloadPolicy needs an accelerator to offload from; without one the run stops
    before any worker starts, with the field named (exit 2), instead of inside the first
    all-gather. (Workers launched by plain torchrun check it too, in FSDP2Backend.)"""
    d, cfg, _ = setup
    run = d / "offload"
    proc = train(cfg, run, *ENGINES["fsdp2"], "distributed.cpu_offload=true")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "distributed.cpu_offload" in proc.stderr and "GPU" in proc.stderr
    assert "Traceback" not in proc.stderr  # one line, from the launching command
    assert not (run / "checkpoints").exists()


def test_deepspeed_zero3_offload_matches_one_process_and_resumes(setup):
    """ZeRO-Offload through the DeepSpeed dict (optimizer state and parameters in host memory),
    which DeepSpeed runs on CPU-only workers too: the engine steps DeepSpeed's CPU Adam over the
    offloaded fp32 partitions, the chain equals the one-process chain (torch's AdamW there; the
    same update up to float rounding), and a crash resumes from a mid-link checkpoint, with the
    offloaded Adam state restored, to the uninterrupted run."""
    d, cfg, single = setup
    engine = ["distributed.strategy=deepspeed",
              "distributed.deepspeed={zero_optimization: {stage: 3, stage3_param_persistence_threshold: 0, "
              "offload_optimizer: {device: cpu}, offload_param: {device: cpu}}}"]
    run, described = d / "zero3-offload", d / "zero3-offload.json"
    probe = f"run.callbacks=[{{class: 'tests.probes:DescribeOptimizer', args: {{out: '{described}'}}}}]"
    proc = train(cfg, run, *engine, probe)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # ... and ZeRO-3 keeps at most one decoder block gathered (in the tiny model 9,216
    # projection and 64 norm weights, and 384 factor elements; fill_stage3_limits)
    assert json.loads(described.read_text()) == {"optimizer": "DeepSpeedCPUAdam", "offload_optimizer": True,
                                                 "offload_param": True, "max_live_parameters": 9664,
                                                 "gathers_by_broadcasts": True, "shm_op": False}
    assert meta(run)["merged"] == [0, 1, 2]
    assert_chains_close(single, run)
    assert torch.allclose(torch.tensor(losses(run)), torch.tensor(losses(single)), atol=1e-5)

    crashed = d / "zero3-offload-crash"
    proc = train(cfg, crashed, *engine, "checkpoint.every_steps=2", faults(crash_at_step=5))
    assert proc.returncode != 0
    assert find_latest(crashed).name == "link-00001-step-0000004"
    proc = train(cfg, crashed, *engine, "checkpoint.every_steps=2", resume=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_chains_close(run, crashed, rtol=1e-6, atol=1e-8)
    assert losses(crashed) == pytest.approx(losses(run), abs=1e-6)


def test_ddp_gradient_accumulation_all_reduces_once_per_step(setup):
    """grad_accum 2 under DDP: the same chain as one process with grad_accum 2, and as many
    gradient bytes all-reduced per optimizer step as without accumulation (no_sync on the first
    micro-batch); the step records count them (``comm_bytes``, through DDP's comm hook)."""
    d, cfg, _ = setup
    single = d / "single-accum2"
    proc = run_cli("train", str(cfg), f"run.dir={single}", "train.grad_accum=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    per_step = {}
    for accum in (1, 2):
        run = d / f"ddp-accum{accum}"
        proc = train(cfg, run, *ENGINES["ddp"], f"train.grad_accum={accum}")
        assert proc.returncode == 0, proc.stderr[-3000:]
        per_step[accum] = {r["comm_bytes"] for r in read_jsonl(run / "metrics.jsonl") if r["type"] == "step"}
    assert_chains_close(single, d / "ddp-accum2")
    assert torch.allclose(torch.tensor(losses(d / "ddp-accum2")), torch.tensor(losses(single)), atol=1e-5)
    # 8 layers' factors, 768 fp32 numbers = 3,072 gradient bytes, plus the logged loss (8 bytes)
    assert per_step[1] == per_step[2] == {768 * 4 + 8}


def test_an_error_in_a_worker_is_one_line_naming_the_rank(setup):
    """A bug in one worker (not a config error): the user sees one line with the rank and the
    cause, and where the traceback went; neither the worker's nor torchrun's traceback."""
    d, cfg, _ = setup
    run = d / "worker-error"
    proc = train(cfg, run, *ENGINES["ddp"], faults(raise_at_step=2, raise_rank=1))
    assert proc.returncode != 0
    errors = [x for x in proc.stderr.splitlines() if x.startswith("raclora: error:")]
    (line,) = [x for x in errors if "injected" in x]
    assert line.startswith("raclora: error: rank 1: RuntimeError: injected failure at step 2 (traceback: ")
    assert all(x.startswith("raclora: error: rank ") for x in errors)  # the other rank: its own consequence
    assert "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr
    assert "torch/distributed/elastic" not in proc.stderr
    log = Path(line.rsplit("(traceback: ", 1)[1].rstrip(")"))
    assert "Traceback (most recent call last)" in log.read_text() and "injected failure" in log.read_text()
    log.unlink()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_a_stopped_launch_stops_its_workers_in_one_line_and_resumes(sig, setup):
    """SIGTERM (a scheduler) or SIGINT (Ctrl-C) to the `raclora train` that started the workers:
    the workers stop with it, one line says so, and --resume ends where the whole run ends."""
    d, cfg, single = setup
    run = d / f"stopped-{sig.name}"
    cmd = [sys.executable, "-m", "raclora_dist", "train", str(cfg), f"run.dir={run}", "distributed.workers=2",
           *ENGINES["ddp"], faults(sleep_per_step=0.5)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=subprocess_env(OMP_NUM_THREADS="1"), preexec_fn=as_on_a_terminal)
    while proc.poll() is None and find_latest(run) is None:
        time.sleep(0.2)  # until the first link's checkpoint is complete
    proc.send_signal(sig)
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err[-3000:]
    assert f"raclora: stopped by {sig.name}; the workers were stopped" in err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    assert not processes_mentioning(str(run)), "workers outlived the launch"
    assert train(cfg, run, *ENGINES["ddp"], resume=True).returncode == 0
    assert meta(run)["merged"] == [0, 1, 2]
    assert_chains_close(single, run)


def test_torchrun_across_two_nodes_equals_one_process(setup):
    """Two torchrun agents, one worker each, meeting through a c10d rendezvous on 127.0.0.1 as two
    "nodes" would (--nnodes 2; node ranks assigned by the rendezvous): launch/README.md's torchrun
    line for a cluster without Ray."""
    d, cfg, single = setup
    run, outs = two_nodes(cfg, lambda attempt: d / f"two-nodes-{attempt}", *ENGINES["fsdp2"])
    assert all(rc == 0 for rc, _, _ in outs), [err[-2000:] for _, _, err in outs]
    assert meta(run)["world_size"] == 2 and meta(run)["merged"] == [0, 1, 2]
    assert_chains_close(single, run)
    assert torch.allclose(torch.tensor(losses(run)), torch.tensor(losses(single)), atol=1e-5)
