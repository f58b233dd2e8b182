"""Ray clusters of several nodes on this machine (``ray.cluster_utils.Cluster``: one raylet
per node, workers placed one per node by a custom resource), where a node is lost whole: its
raylet and every worker it runs are killed, and its disk (the run folder) with them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from raclora_dist.train.checkpoint import find_latest
from tests.conftest import ROOT, faults, read_jsonl, run_cli, subprocess_env, tiny_config, write_config
from tests.distributed.test_backends import chain

pytestmark = pytest.mark.slow


def ancestors(pid: int) -> list[int]:
    out = []
    while pid > 1:
        stat = Path(f"/proc/{pid}/stat").read_text()
        pid = int(stat.rsplit(")", 1)[1].split()[1])
        out.append(pid)
    return out


def raylet_pids(node) -> list[int]:
    return [p.process.pid for p in node.all_processes.get("raylet", [])]


@pytest.fixture
def cluster():
    """A head with no CPUs (the driver's node) and two worker nodes with one ``slot`` each;
    shut down (every raylet gone) after the test, even when it fails."""
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0}, connect=False)
    pids: list[int] = []
    try:
        for _ in range(2):
            pids += raylet_pids(c.add_node(num_cpus=1, resources={"slot": 1}))
        c.wait_for_nodes()
        yield c, pids
    finally:
        c.shutdown()
        time.sleep(1)
        assert not [p for p in pids if Path(f"/proc/{p}").exists()], "raylets outlived the cluster"


def test_losing_the_node_of_rank_0_and_its_disk_resumes_from_storage_on_a_new_node(cluster, small_data, tmp_path):
    c, pids = cluster
    cfg = write_config(tmp_path / "c.yaml", tiny_config(small_data, tmp_path / "unused", ray={"enabled": True}))
    reference = tmp_path / "reference"  # the same engine and world size, uninterrupted (torchrun)
    proc = run_cli("train", str(cfg), f"run.dir={reference}", "ray.enabled=false", "distributed.strategy=ddp",
                   "distributed.workers=2", env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]

    run, storage, pid_dir = tmp_path / "run", tmp_path / "storage", tmp_path / "pids"
    cmd = [sys.executable, "-m", "raclora_dist", "train", str(cfg), f"run.dir={run}", "distributed.strategy=ddp",
           "distributed.workers=2", f"ray.address={c.address}", "ray.max_failures=2", f"ray.storage_path={storage}",
           "ray.resources_per_worker={CPU: 1, slot: 1}", faults(sleep_per_step=1.0, pid_dir=str(pid_dir))]
    driver = subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        metrics = run / "metrics.jsonl"
        for _ in range(1000):  # until link 0 is recorded (a guard against a hang, not a speed check)
            if metrics.is_file() and any(r["type"] == "link" for r in read_jsonl(metrics)):
                break
            assert driver.poll() is None, driver.stdout.read()[-3000:]
            time.sleep(0.3)
        else:
            pytest.fail("link 0 was never recorded")
        time.sleep(1.5)  # mid-way through link 1 (a step takes a second)
        rank0 = int((pid_dir / "rank0.pid").read_text())
        lineage = ancestors(rank0)
        (victim,) = [n for n in c.worker_nodes if set(raylet_pids(n)) & set(lineage)]
        shutil.rmtree(run)  # the node's disk is lost with it
        c.remove_node(victim, allow_graceful=False)  # its raylet and every worker it started
        pids += raylet_pids(c.add_node(num_cpus=1, resources={"slot": 1}))  # replacement capacity
        out, _ = driver.communicate(timeout=600)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    assert driver.returncode == 0, out[-3000:]
    assert not Path(f"/proc/{rank0}").exists()
    # (the driver's copy of the workers' lines may miss some of a lost node's: read the record)
    assert [r["link"] for r in read_jsonl(run / "metrics.jsonl") if r["type"] == "resume"] == [1]
    # The run ends with the uninterrupted run's chain, bitwise, and every link's record once
    # (the metrics so far came back from storage with the checkpoint).
    a, b = chain(reference), chain(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["link"] for r in read_jsonl(run / "metrics.jsonl") if r["type"] == "link"] == [0, 1, 2]
    assert find_latest(run) is not None and os.path.isdir(storage)
