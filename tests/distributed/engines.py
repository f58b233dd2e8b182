"""Running the engines in tests: the overrides that select each, `raclora train` with 2
workers that checks nothing is left behind, and readers of a run folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from raclora_dist.checkpoint.folder import chain_tensors, find_latest
from tests.helpers import read_jsonl, run_cli, subprocess_env, tiny_config, write_config

ENGINES = {
    "ddp": ["distributed.strategy=ddp"],
    "fsdp2": ["distributed.strategy=fsdp2"],
    "zero2": ["distributed.strategy=deepspeed", "distributed.deepspeed={zero_optimization: {stage: 2}}"],
    "zero3": ["distributed.strategy=deepspeed",
              "distributed.deepspeed={zero_optimization: {stage: 3, stage3_param_persistence_threshold: 0}}"],
}


def shm_files() -> set[str]:
    return {p for p in os.listdir("/dev/shm") if "deepspeed" in p} if os.path.isdir("/dev/shm") else set()


def processes_mentioning(text: str) -> list[int]:
    """PIDs whose command line mentions ``text`` (leftover workers of a run)."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmd and int(pid) != os.getpid():
            pids.append(int(pid))
    return pids


def train(cfg: Path, run: Path, *overrides: str, env: dict | None = None, resume: bool = False):
    """`raclora train` with 2 workers by default; checks nothing is left behind."""
    before = shm_files()
    args = ["train", str(cfg), f"run.dir={run}", "distributed.workers=2", *overrides]
    proc = run_cli(*args, *(["--resume"] if resume else []), env={"OMP_NUM_THREADS": "1", **(env or {})})
    assert not processes_mentioning(str(run)), "worker processes outlived the run"
    assert shm_files() <= before, "shared-memory files left behind"
    return proc


def one_process_reference(d: Path, small_data: Path) -> tuple[Path, Path, Path]:
    """``(d, config, run)``: the tiny model's config in ``d`` and its one-process run in
    ``d/single``, the reference the engines are held to."""
    cfg = write_config(d / "c.yaml", tiny_config(small_data, d / "unused"))
    single = d / "single"
    proc = run_cli("train", str(cfg), f"run.dir={single}")
    assert proc.returncode == 0, proc.stderr
    return d, cfg, single


def two_nodes(cfg: Path, run_for, *overrides: str, per_node: int = 1) -> tuple[Path, list]:
    """`raclora train` under two torchrun agents of ``per_node`` workers each, meeting through
    a c10d rendezvous on 127.0.0.1 as two nodes would (--nnodes 2; node ranks assigned by the
    rendezvous): launch/README.md's torchrun line for a cluster without Ray.

    Args:
        run_for: attempt number -> the run folder (a port found free may be taken before the
            rendezvous binds it: up to 3 attempts, each in a fresh folder).

    Returns:
        The run folder and the two agents' ``(returncode, stdout, stderr)``.
    """
    from tests.ray_head import free_port

    env = subprocess_env(OMP_NUM_THREADS="1")
    for attempt in range(3):
        run = run_for(attempt)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--nproc_per_node={per_node}",
               "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--rdzv-id=raclora-two-nodes",
               "-m", "raclora_dist", "train", str(cfg), f"run.dir={run}",
               f"distributed.workers={2 * per_node}", *overrides]
        nodes = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
                 for _ in range(2)]
        outs = [(n.returncode, *o) for n, o in ((n, n.communicate(timeout=600)) for n in nodes)]
        if not any("Address already in use" in err for _, _, err in outs):
            break
    assert not processes_mentioning(str(run)), "worker processes outlived the run"
    return run, outs


def chain(run: Path) -> dict[str, torch.Tensor]:
    return chain_tensors(find_latest(run))


def meta(run: Path) -> dict:
    return json.loads((find_latest(run) / "meta.json").read_text())


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in read_jsonl(run / "metrics.jsonl") if r["type"] == "step"]


def eval_losses(run: Path) -> list[float]:
    return [r["eval_loss"] for r in read_jsonl(run / "metrics.jsonl") if r["type"] in ("eval", "link")]


def assert_chains_close(a: Path, b: Path, rtol=1e-4, atol=1e-6) -> None:
    ca, cb = chain(a), chain(b)
    assert ca.keys() == cb.keys()
    for k in ca:
        assert torch.allclose(ca[k], cb[k], rtol=rtol, atol=atol), (k, (ca[k] - cb[k]).abs().max())
