"""Ray Train and Ray jobs for real: an embedded local Ray, a head started with `ray start` on
127.0.0.1, a worker killed by PID, a driver started again. Results are compared with the
one-process run on the same global batches (tolerance as in tests/distributed)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from raclora_dist.checkpoint.folder import chain_tensors, find_latest
from raclora_dist.orchestration.ray_train import EMBEDDED_POLL_S, POLL_ENV
from tests.faults import wait_for_marker
from tests.helpers import ROOT, faults, read_jsonl, run_cli, subprocess_env, tiny_config, write_config
from tests.ray_head import RAY, start_head

pytestmark = pytest.mark.slow

STRATEGIES = {
    "fsdp2": ["distributed.strategy=fsdp2"],
    "deepspeed": ["distributed.strategy=deepspeed", "distributed.deepspeed={zero_optimization: {stage: 3}}"],
}


def chain(run: Path) -> dict:
    return chain_tensors(find_latest(run))


def assert_chain_equals(reference: Path, run: Path) -> None:
    a, b = chain(reference), chain(run)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6), k


def storage_checkpoints(storage: Path) -> list[Path]:
    return sorted(p for p in storage.rglob("checkpoint_*") if (p / "meta.json").is_file())


@pytest.fixture(scope="module")
def setup(tmp_path_factory, small_data, one_process_run):
    """The tiny model's config with Ray on, and the one-process run of the same config."""
    d = tmp_path_factory.mktemp("ray")
    cfg = write_config(d / "c.yaml", tiny_config(small_data, d / "unused", ray={"enabled": True}))
    return d, cfg, one_process_run[1]


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_ray_train_with_two_workers_equals_the_one_process_run(strategy, setup):
    d, cfg, single = setup
    run, seen = d / f"ray-{strategy}", d / f"ray-{strategy}-env.json"
    spread = ["ray.placement_strategy=SPREAD"] if strategy == "fsdp2" else []  # one node: SPREAD is best effort
    probe = f"run.callbacks=[{{class: 'tests.probes:Environment', args: {{out: '{seen}', names: [{POLL_ENV}]}}}}]"
    proc = run_cli("train", str(cfg), f"run.dir={run}", "distributed.workers=2", *STRATEGIES[strategy], *spread, probe)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_chain_equals(single, run)
    # the embedded Ray's processes poll often (Ray's 2 s default: 6.4 s more at the end of a run)
    assert json.loads(seen.read_text()) == {POLL_ENV: os.environ.get(POLL_ENV, EMBEDDED_POLL_S)}
    stored = storage_checkpoints(run / "ray")  # the default storage: <run.dir>/ray
    assert stored, "no checkpoint reached Ray storage"
    assert json.loads((stored[-1] / "meta.json").read_text())["merged"] == [0, 1, 2]


def test_a_worker_killed_mid_link_is_restarted_and_the_run_ends_as_if_uninterrupted(setup):
    d, cfg, single = setup
    run, pids = d / "ray-killed", d / "pids"
    env = subprocess_env()
    proc = subprocess.Popen([sys.executable, "-m", "raclora_dist", "train", str(cfg), f"run.dir={run}",
                             "distributed.workers=2", "ray.max_failures=1", *STRATEGIES["fsdp2"],
                             "run.trackers=[tensorboard]", faults(pid_dir=str(pids), hold_at_step=4, hold_rank=1)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # rank 1 holds after step 4 (one step into link 2) until killed: the kill lands there
        wait_for_marker(pids / "held-at-step4", proc, "rank 1 reached step 4")
        victim = int((pids / "rank1.pid").read_text())
        os.kill(victim, signal.SIGKILL)
        out, _ = proc.communicate(timeout=600)
    finally:
        proc.kill()
    assert proc.returncode == 0, out[-3000:]
    assert int((pids / "rank1.pid").read_text()) != victim, "Ray did not restart the worker group"
    assert "resumed at link 2 (step 3): the worker group was (re)started" in out  # shown even when quiet
    assert sum(line.startswith("link 2/3 ") for line in out.splitlines()) == 1  # once, not per attempt
    # the restarted group's rank 0 continued the same TensorBoard run: every step once, in order
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 10))
    assert_chain_equals(single, run)


def test_a_worker_lost_before_its_report_resumes_from_the_run_folder(setup):
    """Rank 0 has written link 0's checkpoint into the run folder, but rank 1 dies before
    reporting it, so Ray may hand the restarted group no checkpoint. The run folder was empty
    when the run started, so the restarted group resumes from it instead of refusing it."""
    d, cfg, single = setup
    run, pids = d / "ray-lost-report", d / "pids-lost-report"
    proc = run_cli("train", str(cfg), f"run.dir={run}", "distributed.workers=2", "ray.max_failures=1",
                   *STRATEGIES["fsdp2"], faults(pid_dir=str(pids), die_before_report=1))
    assert (pids / "died-before-report").is_file()  # the fault really happened
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "resumed" in proc.stdout + proc.stderr
    assert_chain_equals(single, run)


def test_a_restarted_driver_resumes_from_storage(setup):
    d, cfg, single = setup
    run = d / "ray-driver"
    args = ["train", str(cfg), f"run.dir={run}", "distributed.workers=2", *STRATEGIES["fsdp2"]]
    first = run_cli(*args, faults(crash_at_step=5))  # dies mid link 2; no restarts allowed
    assert first.returncode != 0
    second = run_cli(*args)  # same name and storage: Ray hands back the latest checkpoint
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed" in second.stdout + second.stderr and "at link 2 (step 3)" in second.stdout + second.stderr
    assert_chain_equals(single, run)


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A Ray head started with `ray start --head` on 127.0.0.1 (random free ports); stopped after."""
    tmp = tmp_path_factory.mktemp("head")
    env = {**os.environ, "RAY_AUTH_MODE": "token", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "RAY_TMPDIR": str(tmp)}
    port, dash = start_head(env, tmp, "--num-cpus=2")
    try:
        yield f"http://127.0.0.1:{dash}", {**env, "RACLORA_TEST_GCS": f"127.0.0.1:{port}"}
    finally:
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)


AGENT_KV = """
import sys
from ray._raylet import GcsClient
from ray._private.ray_constants import KV_NAMESPACE_DASHBOARD as NS
from ray.dashboard.consts import DASHBOARD_AGENT_ADDR_NODE_ID_PREFIX as PREFIX
import os
gcs = GcsClient(address=os.environ["RACLORA_TEST_GCS"])
path = sys.argv[2]
if sys.argv[1] == "hide":
    (key,) = gcs.internal_kv_keys(PREFIX.encode(), NS)
    value = gcs.internal_kv_get(key, NS)
    open(path, "wb").write(key + b"\\n" + value)
    gcs.internal_kv_del(key, False, NS)
else:
    key, value = open(path, "rb").read().split(b"\\n", 1)
    gcs.internal_kv_put(key, value, True, NS)
"""


def agent_kv(env: dict, action: str, saved: Path) -> None:
    """Hides the head's job-agent address from Ray's job server (the state of a head whose
    agent has not registered yet) or puts it back."""
    subprocess.run([sys.executable, "-c", AGENT_KV, action, str(saved)], env=env, check=True, timeout=60,
                   capture_output=True)


def test_submit_waits_for_the_heads_job_agent_then_fails_clearly_or_submits(head, setup, tmp_path):
    """Right after `ray start` the job server answers "No available agent" until the head's
    agent registers. Reproduced on a real head by withholding the agent's address (this test
    must be the first to submit to the head: the server remembers an agent once found)."""
    address, env = head
    _d, cfg, _ = setup
    work = tmp_path / "job"
    work.mkdir()
    (work / "data.jsonl").write_text(Path(yaml_data_path(cfg)).read_text())
    write_config(work / "job.yaml", tiny_config(Path("data.jsonl"), Path("runs/job"),
                                                raclora={"links": 1, "steps_per_link": 1}, ray={"enabled": True}))
    saved = tmp_path / "agent"
    agent_kv(env, "hide", saved)
    cmd = [sys.executable, "-m", "raclora_dist", "submit", "job.yaml", "distributed.workers=1",
           f"ray.storage_path={tmp_path / 'storage'}", "--address", address]
    never = subprocess.run([*cmd, "--agent-wait", "5"], cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert never.returncode == 1
    assert "waiting for the head's job agent" in never.stdout
    assert f"raclora: error: the Ray head at {address} has no job agent after 5 s" in never.stderr
    assert "Traceback" not in never.stderr

    proc = subprocess.Popen([*cmd, "--submission-id", "raclora-test-agent"], cwd=work, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = []
    for line in proc.stdout:  # event-driven: the agent comes back once the command says it waits
        out.append(line)
        if "waiting for the head's job agent" in line:
            agent_kv(env, "restore", saved)
    assert proc.wait(timeout=300) == 0, "".join(out)[-3000:]
    assert "job raclora-test-agent: SUCCEEDED" in "".join(out)


def test_job_submission_to_a_head_started_with_ray_start(head, setup, tmp_path):
    address, env = head
    _d, cfg, _single = setup
    work = tmp_path / "job"
    work.mkdir()
    (work / "data.jsonl").write_text(Path(yaml_data_path(cfg)).read_text())
    write_config(work / "job.yaml", tiny_config(Path("data.jsonl"), Path("runs/job"), ray={"enabled": True}))
    storage = tmp_path / "storage"
    proc = subprocess.run([sys.executable, "-m", "raclora_dist", "submit", "job.yaml", "distributed.workers=2",
                           "distributed.strategy=ddp", f"ray.storage_path={storage}", "--address", address,
                           "--submission-id", "raclora-test-ok"],
                          cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "job raclora-test-ok: SUCCEEDED" in proc.stdout
    status = subprocess.run([sys.executable, "-m", "raclora_dist", "status", "raclora-test-ok", "--address", address],
                            env=env, capture_output=True, text=True, timeout=120)
    assert status.stdout.strip() == "SUCCEEDED"
    stored = storage_checkpoints(storage)
    assert stored and json.loads((stored[-1] / "meta.json").read_text())["merged"] == [0, 1, 2]

    # an invalid config fails fast in the job, with the validation error in its logs
    bad = subprocess.run([sys.executable, "-m", "raclora_dist", "submit", "job.yaml", "raclora.sketch_side=middle",
                          "--address", address, "--submission-id", "raclora-test-bad"],
                         cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0
    assert "job raclora-test-bad: FAILED" in bad.stdout
    assert "raclora.sketch_side" in bad.stdout and "'left', 'right' or 'auto'" in bad.stdout
    logs = subprocess.run([sys.executable, "-m", "raclora_dist", "logs", "raclora-test-bad", "--address", address],
                          env=env, capture_output=True, text=True, timeout=120)
    assert "raclora.sketch_side" in logs.stdout


def yaml_data_path(cfg: Path) -> str:
    import yaml

    return yaml.safe_load(cfg.read_text())["data"]["path"]


def test_the_readme_submit_command_works_from_the_repository_folder(head, tmp_path, corpus):
    """`raclora submit configs/quickstart.yaml --address ...` run from the repository folder,
    whose .gitignore leaves out the bundled data: it is uploaded anyway, and the job trains.
    (Shortened by overrides, and run.dir outside the repository: nothing else changes.)"""
    address, env = head
    run = tmp_path / "quickstart"
    proc = subprocess.run([sys.executable, "-m", "raclora_dist", "submit", "configs/quickstart.yaml",
                           f"run.dir={run}", "raclora.links=1", "raclora.steps_per_link=2", "train.eval_batches=1",
                           "--address", address, "--submission-id", "raclora-test-readme"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "uploading data/stdlib_docstrings.jsonl too" in proc.stdout
    assert "job raclora-test-readme: SUCCEEDED" in proc.stdout
    links = [r for r in read_jsonl(run / "metrics.jsonl") if r["type"] == "link"]
    assert [r["link"] for r in links] == [0] and links[0]["merged"]
    assert list((run / "ray").rglob("checkpoint_*/meta.json")), "no checkpoint in Ray storage"


def test_the_embedded_ray_never_joins_a_head_already_on_the_machine(setup, tmp_path):
    """A head with no CPUs, started by `ray start` in the temp folder the run sees: an embedded
    run must start its own Ray (before, Ray joined that head and the run waited forever), and
    no driver of ours ever connects to the head (no driver log in its session)."""
    _d, cfg, _single = setup
    temp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    env = subprocess_env(RAY_TMPDIR=str(temp), RAY_AUTH_MODE="token")
    start_head(env, temp / "ray", "--num-cpus=0", dashboard=False)
    try:
        # Ray's default temp folder under RAY_TMPDIR: where `ray start` leaves ray_current_cluster
        head_logs = (temp / "ray" / "session_latest").resolve() / "logs"
        drivers_before = sorted(head_logs.glob("python-core-driver-*"))
        proc = subprocess.run([sys.executable, "-m", "raclora_dist", "train", str(cfg), f"run.dir={tmp_path / 'run'}",
                               "distributed.workers=1", "distributed.strategy=single"],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)  # joined: waits forever
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "embedded" in proc.stdout
        assert sorted(head_logs.glob("python-core-driver-*")) == drivers_before
        links = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["type"] == "link"]
        assert [r["link"] for r in links] == [0, 1, 2]
    finally:
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)
