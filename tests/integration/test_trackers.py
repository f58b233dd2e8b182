"""Experiment trackers offline: TensorBoard event files, an MLflow SQLite store, W&B offline;
read back with each library's own reader. A resumed run continues the same tracker run and
sends no step twice."""

from __future__ import annotations

import json
import time

import pytest

from raclora_dist.observe.runs import STALE_S
from tests.helpers import faults, read_jsonl, run_cli, tiny_config, write_config

pytestmark = pytest.mark.slow

TRACKERS = "run.trackers=[tensorboard, mlflow, wandb]"
# Credentials in config values a tracker would log (ray is off in this run: they go nowhere else).
SECRET = "hunter2"
CREDENTIALS = [f"ray.address=ray://alice:{SECRET}@head:10001",
               f"ray.storage_path=s3://bucket/runs?region=x&secret_access_key={SECRET}"]


def tb_scalars(run_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def mlflow_history(run_dir, key):
    """The run as MLflow's own API finds it, with no setting (no MLFLOW_ALLOW_FILE_STORE)."""
    import os

    import mlflow
    from mlflow.tracking import MlflowClient

    assert "MLFLOW_ALLOW_FILE_STORE" not in os.environ
    uri = f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"
    mlflow.set_tracking_uri(uri)
    found = mlflow.search_runs(experiment_names=[run_dir.name], output_format="list")
    assert len(found) == 1
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(found[0].info.run_id)
    return run, [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]


def runs_state(folder):
    """(links, state) of the one run in ``folder``, as `raclora runs` prints them."""
    proc = run_cli("runs", str(folder))
    assert proc.returncode == 0, proc.stderr
    header, row = proc.stdout.strip().splitlines()
    assert header.split()[:3] == ["run", "engine", "links"]
    cells = row.split()
    assert cells[0] == "run" and cells[1:4] == ["single", "x", "1"]
    return cells[4], cells[-1]


def test_runs_states(tmp_path, small_data):
    import os

    (tmp_path / "broken").mkdir()
    write_config(tmp_path / "broken" / "config.yaml", tiny_config(small_data, tmp_path / "broken"))
    proc = run_cli("runs", str(tmp_path))
    assert proc.stdout.strip().splitlines()[1].split()[-1] == "failed"  # nothing to resume from
    marker = tmp_path / "broken" / "running.json"
    marker.write_text(json.dumps({"pid": os.getpid(), "host": os.uname().nodename}))
    proc = run_cli("runs", str(tmp_path))
    assert proc.stdout.strip().splitlines()[1].split()[-1] == "running"
    # Another machine's marker (a shared run folder): running while its process keeps it fresh.
    marker.write_text(json.dumps({"pid": 1, "host": "another-node"}))
    assert run_cli("runs", str(tmp_path)).stdout.strip().splitlines()[1].split()[-1] == "running"
    old = time.time() - STALE_S - 5
    os.utime(marker, (old, old))
    assert run_cli("runs", str(tmp_path)).stdout.strip().splitlines()[1].split()[-1] == "failed"
    assert run_cli("runs", str(tmp_path / "nope")).returncode != 0


def test_a_failed_run_leaves_no_running_marker(tmp_path, small_data):
    cfg = write_config(tmp_path / "c.yaml", tiny_config(small_data, tmp_path / "run"))
    proc = run_cli("train", str(cfg), faults(raise_at_step=2))
    assert proc.returncode == 1 and "injected failure at step 2" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "run" / "running.json").exists()
    assert runs_state(tmp_path)[1] == "failed"


def test_trackers_hold_every_step_once_across_a_crash_and_resume(tmp_path, small_data):
    cfg = write_config(tmp_path / "c.yaml", tiny_config(small_data, tmp_path / "run"))
    run = tmp_path / "run"
    crashed = run_cli("train", str(cfg), TRACKERS, *CREDENTIALS, faults(crash_at_step=5))
    assert crashed.returncode == 17, crashed.stderr[-2000:]
    first_id = json.loads((run / "trackers.json").read_text())["mlflow_run_id"]
    assert runs_state(tmp_path) == ("1/3", "resumable")
    resumed = run_cli("train", str(cfg), TRACKERS, *CREDENTIALS, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert runs_state(tmp_path) == ("3/3", "finished")
    want = [(r["step"], r["loss"]) for r in read_jsonl(run / "metrics.jsonl") if r["type"] == "step"]
    assert [s for s, _ in want] == list(range(1, 10))

    got = tb_scalars(run, "train/loss")  # TensorBoard's own reader
    assert [s for s, _ in got] == [s for s, _ in want]
    assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6)
    assert [s for s, _ in tb_scalars(run, "link/eval_loss")] == [3, 6, 9]

    mrun, hist = mlflow_history(run, "train.loss")  # MLflow's client
    assert mrun.info.run_id == first_id  # the resumed run continued the same MLflow run
    assert [s for s, _ in sorted(hist)] == [s for s, _ in want]  # every step, none twice
    assert mrun.data.params["raclora.rank"] == "2" and mrun.data.params["train.lr"] == "0.005"
    assert mrun.info.status == "FINISHED"
    assert mrun.data.params["ray.address"] == "ray://alice:***@head:10001"  # redacted, still readable
    assert SECRET not in json.dumps(mrun.data.params)
    for tracked in ("tensorboard", "wandb", "mlflow.db", "mlartifacts"):
        for f in [run / tracked] if (run / tracked).is_file() else (run / tracked).rglob("*"):
            assert not f.is_file() or SECRET.encode() not in f.read_bytes(), f"a credential reached {f}"

    offline = list((run / "wandb").glob("offline-run-*"))  # W&B offline: one run, resumed, with history
    assert offline and all(f.name.endswith(json.loads((run / "trackers.json").read_text())["wandb_id"]) for f in offline)
    assert any(p.stat().st_size > 0 for f in offline for p in f.glob("*.wandb"))
