"""Ray clusters of several nodes on this machine, where a node is lost whole (its raylet and
every worker it runs are killed, and its disk with them):

* ``ray.cluster_utils.Cluster`` nodes (one raylet each, workers placed one per node by a
  custom resource) sharing the host's filesystem: DDP, rank 0's run folder deleted;
* ``ray start`` nodes each in a mount namespace of its own with a private folder mounted over
  the run folder's path (:class:`PrivateDiskNodes`: disks that share nothing, storage aside):
  DeepSpeed ZeRO-3 losing the node of rank 0, and a ``raclora submit`` job whose driver runs
  on the head."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from raclora_dist.checkpoint.folder import chain_tensors, find_latest
from tests.distributed.engines import chain
from tests.faults import wait_for_marker
from tests.helpers import ROOT, faults, read_jsonl, run_cli, subprocess_env, tiny_config, write_config
from tests.ray_head import RAY, polling_often, start_head

pytestmark = pytest.mark.slow


def storage_checkpoints(storage: Path) -> list[Path]:
    """Complete raclora checkpoints in Ray storage, oldest first (by global step)."""
    found = [p for p in storage.rglob("checkpoint_*") if (p / "meta.json").is_file()]
    return sorted(found, key=lambda p: json.loads((p / "meta.json").read_text())["global_step"])


def ancestors(pid: int) -> list[int]:
    out = []
    while pid > 1:
        stat = Path(f"/proc/{pid}/stat").read_text()
        pid = int(stat.rsplit(")", 1)[1].split()[1])
        out.append(pid)
    return out


def raylet_pids(node) -> list[int]:
    return [p.process.pid for p in node.all_processes.get("raylet", [])]


@pytest.fixture(params=[2])
def cluster(request, monkeypatch):
    """A head with no CPUs (the driver's node) and ``request.param`` worker nodes with one
    ``slot`` each; shut down (every raylet gone) after the test, even when it fails."""
    from ray.cluster_utils import Cluster

    for key, value in polling_often({}).items():  # the nodes start with this process's environment
        monkeypatch.setenv(key, value)
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0}, connect=False)
    pids: list[int] = []
    try:
        for _ in range(request.param):
            pids += raylet_pids(c.add_node(num_cpus=1, resources={"slot": 1}))
        c.wait_for_nodes()
        yield c, pids
    finally:
        c.shutdown()
        time.sleep(1)
        assert not [p for p in pids if Path(f"/proc/{p}").exists()], "raylets outlived the cluster"


@contextlib.contextmanager
def driving(cmd: list[str]):
    """The Ray driver ``cmd`` as a process (its output merged into stdout), killed if the block
    leaves it running."""
    driver = subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        yield driver
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()


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
           "ray.resources_per_worker={CPU: 1, slot: 1}", faults(hold_at_step=4, pid_dir=str(pid_dir))]
    with driving(cmd) as driver:
        # rank 0 holds after step 4, one step into link 1, until its node is lost
        wait_for_marker(pid_dir / "held-at-step4", driver, "rank 0 reached step 4")
        rank0 = int((pid_dir / "rank0.pid").read_text())
        lineage = ancestors(rank0)
        (victim,) = [n for n in c.worker_nodes if set(raylet_pids(n)) & set(lineage)]
        shutil.rmtree(run)  # the node's disk is lost with it
        c.remove_node(victim, allow_graceful=False)  # its raylet and every worker it started
        pids += raylet_pids(c.add_node(num_cpus=1, resources={"slot": 1}))  # replacement capacity
        out, _ = driver.communicate(timeout=600)
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


@pytest.mark.parametrize("cluster", [0], indirect=True)  # the head only: nodes of 2 slots are added below
def test_an_elastic_hsdp_run_goes_on_without_a_lost_node_and_grows_back_when_it_returns(cluster, small_data,
                                                                                       tmp_path, one_process_run):
    """HSDP over 2 nodes x 2 workers (a replica group per node) with ``ray.min_workers: 2``: the
    node of rank 2 is lost for good one step into link 1; Ray Train restarts the group at once
    on the node left, as one group of 2 (full shard), which resumes from the link-0 checkpoint
    with the same global batch. A node then joins, and at its next resize check Ray grows the
    group back to 2 groups of 2 from the latest checkpoint. Each change is a record and a
    console line; the chain is the one-process chain."""
    c, pids = cluster
    for _ in range(2):
        pids += raylet_pids(c.add_node(num_cpus=2, resources={"slot": 2}))
    c.wait_for_nodes()
    cfg = write_config(tmp_path / "c.yaml", tiny_config(small_data, tmp_path / "unused", ray={"enabled": True}))
    single = one_process_run[1]  # the same config, Ray off

    run, storage, pid_dir = tmp_path / "run", tmp_path / "storage", tmp_path / "pids"
    cmd = [sys.executable, "-m", "raclora_dist", "train", str(cfg), f"run.dir={run}", "distributed.strategy=fsdp2",
           "distributed.workers=4", "distributed.replicas=2", "ray.min_workers=2", "ray.resize_check_s=2",
           f"ray.address={c.address}", "ray.max_failures=3", f"ray.storage_path={storage}",
           "ray.resources_per_worker={CPU: 1, slot: 1}",
           faults(hold_at_step=4, hold_rank=2, hold_at_world=2, pid_dir=str(pid_dir))]
    with driving(cmd) as driver:
        wait_for_marker(pid_dir / "held-at-step4", driver, "rank 2 reached step 4")
        rank2 = int((pid_dir / "rank2.pid").read_text())
        (victim,) = [n for n in c.worker_nodes if set(raylet_pids(n)) & set(ancestors(rank2))]
        c.remove_node(victim, allow_graceful=False)  # for good: no replacement yet
        # The group went on with one node (from the link-0 checkpoint) and, one step on, holds
        # there until Ray grows it: it cannot finish before the capacity returns.
        wait_for_marker(pid_dir / "held-at-world2", driver, "the group of 2 took a step")
        pids += raylet_pids(c.add_node(num_cpus=2, resources={"slot": 2}))  # the capacity returns
        out, _ = driver.communicate(timeout=600)
    assert driver.returncode == 0, out[-3000:]
    resizes = [(r["from_workers"], r["to_workers"]) for r in read_jsonl(run / "metrics.jsonl") if r["type"] == "resize"]
    assert resizes == [(4, 2), (2, 4)], resizes
    assert "workers: 4 -> 2, resumed at link 2" in out and "workers: 2 -> 4" in out, out[-3000:]
    assert [r["link"] for r in read_jsonl(run / "metrics.jsonl") if r["type"] == "link"] == [0, 1, 2]
    # the same global batches at every size: the one-process chain (fp32, up to summation order)
    a, b = chain(single), chain(run)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6), (k, (a[k] - b[k]).abs().max())


def mount_ns(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:
        return None


def all_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


class PrivateDiskNodes:
    """Ray worker nodes started by ``ray start`` each in a mount namespace of its own, where the
    run folder's path is a private directory: every node has its own disk, as on a cluster,
    and the only place they share is Ray's storage (elsewhere on the host)."""

    def __init__(self, address: str, run_dir: Path, disks: Path) -> None:
        self.address, self.run_dir, self.disks = address, run_dir, disks
        self.nodes: dict[str, Path] = {}  # mount namespace -> the node's disk
        self.started = 0

    def add(self) -> str:
        disk = self.disks / f"node{self.started}"
        self.started += 1
        disk.mkdir(parents=True)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        ray = Path(sys.executable).parent / "ray"
        before = {mount_ns(p) for p in all_pids()}
        script = (f"mount --bind {disk} {self.run_dir} && exec {ray} start --address={self.address} --num-cpus=1 "
                  "--resources='{\"slot\": 1}' --object-store-memory=150000000 --disable-usage-stats")
        subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script], check=True,
                       capture_output=True, timeout=180, env=polling_often({**os.environ, "RAY_AUTH_MODE": "disabled"}))
        (ns,) = {mount_ns(p) for p in all_pids()} - before - {None}
        self.nodes[ns] = disk
        return ns

    def kill(self, ns: str) -> None:
        """Every process of the node (raylet, agents, workers), then its disk."""
        for pid in all_pids():
            if mount_ns(pid) == ns:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.nodes.pop(ns))

    def close(self) -> None:
        for ns in list(self.nodes):
            self.kill(ns)


@pytest.mark.parametrize("cluster", [0], indirect=True)  # the head only: the nodes are added below
def test_deepspeed_zero3_on_nodes_with_their_own_disks_resumes_after_a_node_loss(cluster, small_data, tmp_path):
    """No run folder is shared: each rank's DeepSpeed partition files reach storage from its own
    node, and after the node of rank 0 is lost the group resumes on a new node from storage."""
    c, _ = cluster
    zero3 = ["distributed.strategy=deepspeed", "distributed.workers=2",
             "distributed.deepspeed={zero_optimization: {stage: 3, stage3_param_persistence_threshold: 0}}"]
    cfg = write_config(tmp_path / "c.yaml", tiny_config(small_data, tmp_path / "unused", ray={"enabled": True}))
    reference = tmp_path / "reference"
    proc = run_cli("train", str(cfg), f"run.dir={reference}", "ray.enabled=false", *zero3, env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]

    run, storage, pid_dir = tmp_path / "run", tmp_path / "storage", tmp_path / "pids"
    nodes = PrivateDiskNodes(c.address, run, tmp_path / "disks")
    driver = None
    try:
        for _ in range(2):
            nodes.add()
        cmd = [sys.executable, "-m", "raclora_dist", "train", str(cfg), f"run.dir={run}", *zero3,
               f"ray.address={c.address}", "ray.max_failures=2", f"ray.storage_path={storage}",
               "ray.resources_per_worker={CPU: 1, slot: 1}", faults(hold_at_step=4, pid_dir=str(pid_dir))]
        driver = subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
        def parts() -> set[str]:
            found = storage_checkpoints(storage)
            state = found[0] / "deepspeed" / "state" if found else None
            return {p.name for p in state.iterdir()} if state is not None and state.is_dir() else set()

        # Until link 0's checkpoint holds both ranks' optimizer partitions, each uploaded from
        # its own node (a bounded wait against a hang, not a speed check).
        for _ in range(1000):
            if any("zero_pp_rank_0_" in p for p in parts()) and any("zero_pp_rank_1_" in p for p in parts()):
                break
            assert driver.poll() is None, driver.stdout.read()[-3000:]
            time.sleep(0.3)
        else:
            pytest.fail(f"link 0's checkpoint in storage lacks a rank's partition: {sorted(parts())}")
        # rank 0 holds after step 4, one step into link 1, until its node is lost
        wait_for_marker(pid_dir / "held-at-step4", driver, "rank 0 reached step 4")
        assert len(storage_checkpoints(storage)) == 1, "the node must be lost before link 1 ends"
        victim = mount_ns(int((pid_dir / "rank0.pid").read_text()))
        assert victim in nodes.nodes
        nodes.kill(victim)  # the node of rank 0, with its disk
        nodes.add()  # replacement capacity, with an empty disk
        out, _ = driver.communicate(timeout=600)
    finally:
        if driver is not None and driver.poll() is None:
            driver.kill()
            driver.wait()
        nodes.close()
    assert driver.returncode == 0, out[-3000:]
    last = storage_checkpoints(storage)[-1]
    ref = chain_tensors(find_latest(reference))
    got = chain_tensors(last)
    assert ref.keys() == got.keys() and all(torch.allclose(ref[k], got[k], rtol=1e-6, atol=1e-8) for k in ref)
    records = [json.loads(line) for line in (last / "metrics.jsonl").read_text().splitlines()]
    assert [r["link"] for r in records if r["type"] == "link"] == [0, 1, 2]
    assert [r["link"] for r in records if r["type"] == "resume"] == [1]  # resumed once, from link 1


@pytest.fixture
def job_head():
    """A Ray head started with ``ray start --head`` (no CPUs: no worker runs on it; the
    dashboard for jobs on a random free port), stopped with every node after the test."""
    temp = Path(tempfile.mkdtemp(prefix="raclora-ray-"))  # short: Ray's socket paths have a length limit
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    port, dash = start_head(env, temp, "--num-cpus=0")
    try:
        yield f"127.0.0.1:{port}", f"http://127.0.0.1:{dash}", env
    finally:
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)


def test_a_job_on_nodes_with_their_own_disks_runs_its_driver_on_the_head_and_brings_the_run_home(
        job_head, small_data, tmp_path):
    """`raclora submit` to a cluster whose worker nodes have disks of their own: the driver runs
    in the job on the head, no worker writes where the driver is, and the run folder the user
    named ends up on the head all the same (from storage). The default storage (the run folder:
    each node's own disk) is refused there with the field named."""
    from ray.job_submission import JobSubmissionClient
    from ray.util.state import list_nodes

    gcs, address, env = job_head
    work, run, storage = tmp_path / "job", tmp_path / "run", tmp_path / "storage"
    work.mkdir()
    (work / "data.jsonl").write_text(Path(small_data).read_text())
    write_config(work / "job.yaml", tiny_config(Path("data.jsonl"), Path("runs/job"), ray={"enabled": True}))
    nodes = PrivateDiskNodes(gcs, run, tmp_path / "disks")
    try:
        for _ in range(2):
            nodes.add()
        submit = [sys.executable, "-m", "raclora_dist", "submit", "job.yaml", f"run.dir={run}", "distributed.workers=2",
                  "distributed.strategy=ddp", "ray.resources_per_worker={CPU: 1, slot: 1}"]
        proc = subprocess.run([*submit, f"ray.storage_path={storage}", "--address", address,
                               "--submission-id", "raclora-nodes"],
                              cwd=work, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "job raclora-nodes: SUCCEEDED" in proc.stdout
        (head,) = [n.node_id for n in list_nodes(address=address) if n.is_head_node]
        assert JobSubmissionClient(address).get_job_info("raclora-nodes").driver_node_id == head
        # The workers wrote the run folder on their own disks (rank 0's has the records) ...
        disks = list(nodes.nodes.values())
        assert [d for d in disks if (d / "metrics.jsonl").is_file()]
        # ... and the driver's (the head's) holds the final checkpoint and records from storage.
        final = storage_checkpoints(storage)[-1]
        assert find_latest(run).name == "link-00003-step-0000009"
        a, b = chain_tensors(find_latest(run)), chain_tensors(final)
        assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
        assert [r["link"] for r in read_jsonl(run / "metrics.jsonl") if r["type"] == "link"] == [0, 1, 2]

        bad = subprocess.run([*submit, "run.dir=runs/default-storage", "--address", address,
                              "--submission-id", "raclora-local-storage"],
                             cwd=work, env=env, capture_output=True, text=True, timeout=300)
        assert bad.returncode != 0 and "job raclora-local-storage: FAILED" in bad.stdout
        assert "ray.storage_path: this Ray cluster has 3 nodes" in bad.stdout
    finally:
        nodes.close()
