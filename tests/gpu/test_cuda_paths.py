"""The CUDA paths, through the command line as users run it: NCCL, bitsandbytes' CUDA kernels,
bf16 compute and FSDP2's CPU offload. Marked ``gpu``: skipped where CUDA is not available
(tests/conftest.py), run by ``scripts/gpu_bench.sh`` on a GPU machine.

Each has a CPU counterpart in the suite that runs everywhere (named in its docstring): the same
code paths over gloo, bitsandbytes' CPU kernels, fp32/bf16 on the CPU, and the refusal of
``cpu_offload`` without an accelerator.
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.helpers import read_jsonl, run_cli, tiny_config, write_config

pytestmark = pytest.mark.gpu


def _train(tmp_path, small_data, name: str, *overrides: str, **sections) -> list[dict]:
    cfg = write_config(tmp_path / f"{name}.yaml", tiny_config(small_data, tmp_path / name, **sections))
    proc = run_cli("train", str(cfg), *overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return read_jsonl(tmp_path / name / "metrics.jsonl")


def _losses(records: list[dict]) -> list[float]:
    return [r["loss"] for r in records if r["type"] == "step"]


def test_fsdp2_over_nccl_equals_one_cuda_process(tmp_path, small_data):
    """Every GPU of the machine as an FSDP2 worker over NCCL (one GPU: a group of one, still
    NCCL's collectives) against one CUDA process. CPU counterpart:
    tests/distributed/test_backends.py (the engines over gloo against one process)."""
    workers = torch.cuda.device_count()
    batch = f"train.batch_size={4 * workers}"  # the same global batches for both
    one = _train(tmp_path, small_data, "single", batch)
    sharded = _train(tmp_path, small_data, "fsdp2", "distributed.strategy=fsdp2", f"distributed.workers={workers}",
                     "distributed.backend=nccl", batch)
    assert all(math.isfinite(x) for x in _losses(sharded))
    assert _losses(sharded) == pytest.approx(_losses(one), abs=1e-4)


def test_nf4_on_cuda_kernels_trains_as_the_cpu_kernels_do(tmp_path, small_data):
    """An NF4 base quantized, dequantized in the forward and requantized at each merge by
    bitsandbytes' CUDA kernels, against the same run on its CPU kernels (``backend=gloo``
    keeps a worker on the CPU). CPU counterpart: tests/distributed/test_quantized.py."""
    cuda = _train(tmp_path, small_data, "nf4-cuda", "model.quantization=nf4")
    cpu = _train(tmp_path, small_data, "nf4-cpu", "model.quantization=nf4", "distributed.backend=gloo")
    assert _losses(cuda) == pytest.approx(_losses(cpu), rel=2e-2)
    links = [r for r in cuda if r["type"] == "link"]
    assert all(r["merged"] for r in links)


def test_a_bf16_base_on_cuda_lands_its_links_by_stochastic_rounding(tmp_path, small_data):
    """A bf16 base with bf16 compute: merges round stochastically (``torch.nextafter`` on CUDA
    bf16) and land the links whole on average; the run learns. CPU counterpart:
    tests/unit/test_master.py (unbiased rounding, any row split) and
    tests/distributed/test_bf16_master.py (bf16 merges under FSDP2 and ZeRO-3 on gloo)."""
    recs = _train(tmp_path, small_data, "bf16", "model.dtype=bfloat16", "raclora.links=4")
    links = [r for r in recs if r["type"] == "link"]
    assert sum(r["landed_fraction"] for r in links) / len(links) > 0.9
    start = next(r for r in recs if r["type"] == "eval")["eval_loss"]
    assert links[-1]["eval_loss"] < start


def test_fsdp2_cpu_offload_on_cuda_equals_keeping_the_shards_on_the_gpu(tmp_path, small_data):
    """FSDP2's CPUOffloadPolicy: shards, gradients and the optimizer step in host memory give
    the run the GPU-resident shards give. CPU counterpart:
    tests/distributed/test_backends.py::test_fsdp2_cpu_offload_on_cpu_workers_is_a_config_error
    (refused, naming the field, where workers have no accelerator: torch's policy needs one)."""
    fsdp2 = ("distributed.strategy=fsdp2", "distributed.workers=1", "distributed.backend=nccl")
    kept = _train(tmp_path, small_data, "kept", *fsdp2)
    offloaded = _train(tmp_path, small_data, "offloaded", *fsdp2, "distributed.cpu_offload=true")
    assert _losses(offloaded) == pytest.approx(_losses(kept), abs=1e-4)
