"""All-gathers by in-place broadcasts on gloo (``backends/dist.gather_by_broadcasts``), on 2
gloo processes: the same bytes as gloo's all-gather without its staging copy; FSDP2 units
built by the backend (``backends/fsdp2_gloo.py``) and DeepSpeed's ZeRO-3 gathers
(``backends/deepspeed.gather_in_place_on_gloo``) use it."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

N = 32 * 2**20  # floats per rank: 128 MiB, so the 256 MiB output dwarfs gloo's own buffers


def _status_mib(field: str) -> float:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def _measure_gather(gather, rank: int, world: int, out: dict) -> None:
    """Runs ``gather(output, shard)`` on a 128 MiB shard per rank: the peak RSS it adds above
    the buffers (``peak_above``) and whether it equals gloo's all-gather (``equal``)."""
    shard = torch.arange(N, dtype=torch.float32) + rank * N
    got = torch.zeros(world * N)  # touched: only what the gather adds is measured
    Path("/proc/self/clear_refs").write_text("5")  # peak (VmHWM) := current RSS
    before = _status_mib("VmRSS")
    gather(got, shard)
    out[f"peak_above{rank}"] = _status_mib("VmHWM") - before
    want = torch.empty(world * N)
    dist.all_gather_into_tensor(want, shard)
    out[f"equal{rank}"] = torch.equal(got, want)


def _worker(rank: int, world: int, store: str, out: dict) -> None:
    from raclora_dist.backends.fsdp2 import _fully_shard
    from raclora_dist.backends.fsdp2_gloo import broadcast_all_gather

    # a file rendezvous: no free port to find (and race for)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        _measure_gather(lambda got, shard: broadcast_all_gather()(got, shard, dist.group.WORLD).wait(),
                        rank, world, out)

        # FSDP2 units built by the backend's fully_shard gather this way, and compute as the
        # unsharded model does
        torch.manual_seed(0)
        whole = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 8))
        model = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 8))
        model.load_state_dict(whole.state_dict())
        _fully_shard(model[0])
        _fully_shard(model)
        comms = {type(g._all_gather_comm).__name__ for m in (model[0], model)
                 for g in m._get_fsdp_state()._fsdp_param_groups}
        out[f"comms{rank}"] = sorted(comms)
        # with a work handle from the gather, FSDP2 frees a unit's gathered output right after
        # copying it out, not when the next unit gathers (seen between the two units)
        held = []
        comm_ctx = model._get_fsdp_state()._comm_ctx
        model[1].register_forward_pre_hook(lambda m, a: held.append(comm_ctx.all_gather_state is not None))
        x = torch.randn(4, 16, generator=torch.Generator().manual_seed(rank))
        with torch.no_grad():
            out[f"out_err{rank}"] = (model(x) - whole(x)).abs().max().item()
        out[f"held{rank}"] = held
    finally:
        dist.destroy_process_group()


def _run_on_two_ranks(worker, tmp_path) -> dict:
    """Runs ``worker`` on 2 gloo processes; its results, with each rank's gather checked:
    the same bytes as gloo's all_gather_into_tensor, in place (gloo's own all-gather stages a
    second output: measured 258 MiB above the buffers for this 256 MiB output; the broadcasts
    add a few tens of MiB)."""
    out = mp.Manager().dict()
    mp.spawn(worker, args=(2, str(tmp_path / "store"), out), nprocs=2, join=True)
    for rank in range(2):
        assert out[f"equal{rank}"]
        assert out[f"peak_above{rank}"] < 0.5 * (2 * N * 4 / 2**20), out[f"peak_above{rank}"]
    return dict(out)


def test_fsdp2_gathers_in_place_on_gloo(tmp_path):
    out = _run_on_two_ranks(_worker, tmp_path)
    for rank in range(2):
        assert out[f"comms{rank}"] == ["BroadcastAllGather"]
        assert out[f"out_err{rank}"] < 1e-6
        assert out[f"held{rank}"] == [False]


def _deepspeed_worker(rank: int, world: int, store: str, out: dict) -> None:
    import deepspeed
    import deepspeed.comm as ds_dist

    from raclora_dist.backends.deepspeed import gather_in_place_on_gloo, skip_inference_shm_op

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))  # as torchrun sets them
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        skip_inference_shm_op()  # as the backend does: no C++ op built for inference's all-reduce
        deepspeed.init_distributed(dist_backend="gloo", dist_init_required=False)
        out[f"no_shm_op{rank}"] = ds_dist.comm.cdb.shm_comm_op is None
        out[f"on{rank}"] = gather_in_place_on_gloo() and gather_in_place_on_gloo()  # idempotent
        # as ZeRO-3 gathers a parameter
        _measure_gather(lambda got, shard: ds_dist.allgather_fn(got, shard, async_op=True).wait(), rank, world, out)
        small = torch.full((1000,), float(rank))  # below IN_PLACE_GATHER_BYTES: gloo's own gather
        got = torch.empty(world * 1000)
        ds_dist.allgather_fn(got, small, async_op=True).wait()
        out[f"small{rank}"] = torch.equal(got, torch.arange(world).repeat_interleave(1000).float())

        # a module partitioned as the backend partitions one gathers its weights whole
        torch.manual_seed(0)
        whole = nn.Linear(64, 48)
        model = nn.Linear(64, 48)
        model.load_state_dict(whole.state_dict())
        deepspeed.zero.Init(module=model, config_dict_or_path={"zero_optimization": {"stage": 3},
                                                                "train_batch_size": world})
        out[f"partitioned{rank}"] = model.weight.numel() == 0
        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            out[f"whole{rank}"] = torch.equal(model.weight, whole.weight) and torch.equal(model.bias, whole.bias)
    finally:
        dist.destroy_process_group()


def test_deepspeed_gathers_in_place_on_gloo(tmp_path):
    out = _run_on_two_ranks(_deepspeed_worker, tmp_path)  # (without it DeepSpeed calls gloo's all-gather)
    for rank in range(2):
        assert out[f"on{rank}"] and out[f"small{rank}"] and out[f"no_shm_op{rank}"]
        assert out[f"partitioned{rank}"] and out[f"whole{rank}"]
