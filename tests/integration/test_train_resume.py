"""Training through the real CLI; crash-and-resume ends bitwise equal to an uninterrupted run."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from raclora_dist.checkpoint.folder import chain_tensors as checkpoint_tensors
from raclora_dist.checkpoint.folder import find_latest
from raclora_dist.cli import main
from tests.helpers import as_on_a_terminal, faults, read_jsonl, run_cli, subprocess_env, tiny_config, write_config


def chain_tensors(run_dir: Path) -> dict:
    return checkpoint_tensors(find_latest(run_dir))


def step_losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if r["type"] == "step"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, small_data):
    """An uninterrupted 3-link run (in process)."""
    d = tmp_path_factory.mktemp("ref")
    cfg = write_config(d / "c.yaml", tiny_config(small_data, d / "run"))
    assert main(["train", str(cfg)]) == 0
    return d / "run"


def test_run_folder_contents_and_learning(reference):
    recs = read_jsonl(reference / "metrics.jsonl")
    links = [r for r in recs if r["type"] == "link"]
    assert [r["link"] for r in links] == [0, 1, 2] and all(r["merged"] for r in links)
    assert len([r for r in recs if r["type"] == "step"]) == 9
    start = next(r for r in recs if r["type"] == "eval")["eval_loss"]
    assert links[-1]["eval_loss"] < start  # the chain learned something
    assert (reference / "plot.png").stat().st_size > 10_000
    assert (reference / "base" / "model.safetensors").is_file()
    ckpts = sorted(p.name for p in (reference / "checkpoints").glob("link-*"))
    assert ckpts == ["link-00002-step-0000006", "link-00003-step-0000009"]  # keep: 2
    assert set(chain_tensors(reference)) == {
        f"link.{t}.model.layers.{i}.{m}" for t in range(3) for i in range(2)
        for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj", "mlp.down_proj")
    }


@pytest.mark.slow
def test_crash_mid_link_then_resume_is_bitwise_equal(reference, tmp_path, small_data):
    cfg = write_config(tmp_path / "c.yaml", tiny_config(small_data, tmp_path / "run"))
    crashed = run_cli("train", str(cfg), faults(crash_at_step=5))  # mid link 2
    assert crashed.returncode == 17, crashed.stderr
    assert find_latest(tmp_path / "run").name == "link-00001-step-0000003"
    resumed = run_cli("train", str(cfg), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed" in resumed.stdout
    a, b = chain_tensors(reference), chain_tensors(tmp_path / "run")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    assert step_losses(tmp_path / "run") == step_losses(reference)  # steps 4-5 rewritten, not doubled


@pytest.mark.slow
def test_ctrl_c_in_one_process_is_one_line_and_resumes_bitwise(reference, tmp_path, small_data):
    """SIGINT to a one-process run (Ctrl-C): one line, exit 130, no traceback; --resume ends
    bitwise where the uninterrupted run ends. (Launches with workers: test_backends.py.)"""
    cfg = write_config(tmp_path / "c.yaml", tiny_config(small_data, tmp_path / "run"))
    proc = subprocess.Popen([sys.executable, "-m", "raclora_dist", "train", str(cfg), faults(sleep_per_step=0.5)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env(),
                            preexec_fn=as_on_a_terminal)
    while proc.poll() is None and find_latest(tmp_path / "run") is None:
        time.sleep(0.2)  # until the first link's checkpoint is complete
    proc.send_signal(signal.SIGINT)
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "raclora: stopped by SIGINT (--resume continues from the latest checkpoint)" in err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    assert run_cli("train", str(cfg), "--resume").returncode == 0
    a, b = chain_tensors(reference), chain_tensors(tmp_path / "run")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


@pytest.mark.slow
def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(reference, tmp_path, small_data):
    cfg = write_config(tmp_path / "c.yaml", tiny_config(small_data, tmp_path / "run"))
    crashed = run_cli("train", str(cfg), faults(crash_in_checkpoint=2))
    assert crashed.returncode == 17
    root = tmp_path / "run" / "checkpoints"
    assert [p.name for p in root.glob(".tmp-*")], "the half-written checkpoint stays in its temp folder"
    assert find_latest(tmp_path / "run").name == "link-00001-step-0000003"
    assert main(["train", str(tmp_path / "run"), "run.callbacks=[]", "--resume"]) == 0  # a run folder works as the config too
    a, b = chain_tensors(reference), chain_tensors(tmp_path / "run")
    assert all(a[k].equal(b[k]) for k in a)
    assert not list(root.glob(".tmp-*"))


def test_extending_the_chain_resumes_from_the_last_link(reference, tmp_path, small_data):
    cfg = write_config(tmp_path / "c.yaml", tiny_config(small_data, tmp_path / "run", raclora={"links": 2}))
    assert main(["train", str(cfg)]) == 0
    assert main(["train", str(cfg), "raclora.links=3", "--resume"]) == 0
    a, b = chain_tensors(reference), chain_tensors(tmp_path / "run")
    assert all(a[k].equal(b[k]) for k in a)


def test_checkpointing_does_not_touch_a_reset_optimizer(tmp_path, small_data):
    """A checkpoint right after the reset must leave Adam's state empty (a regression: torch's
    get_optimizer_state_dict initialises empty state with a zero-gradient step)."""
    every = write_config(tmp_path / "a.yaml", tiny_config(small_data, tmp_path / "a"))
    rarely = write_config(tmp_path / "b.yaml", tiny_config(small_data, tmp_path / "b", checkpoint={"every_links": 10}))
    assert main(["train", str(every)]) == 0 and main(["train", str(rarely)]) == 0
    assert step_losses(tmp_path / "a") == step_losses(tmp_path / "b")


def test_callbacks_get_every_metrics_line_and_each_checkpoint_its_link_or_step_line(tmp_path, small_data):
    log = tmp_path / "hooks.jsonl"
    probe = {"class": "tests.probes:RecordLog", "args": {"out": str(log)}}
    cfg = write_config(tmp_path / "c.yaml", tiny_config(small_data, tmp_path / "run", checkpoint={"every_steps": 2},
                                                       run={"callbacks": [probe]}))
    assert main(["train", str(cfg)]) == 0
    seen = read_jsonl(log)
    # metrics.jsonl is written by the built-in callback from the same lines
    assert [e["record"] for e in seen if e["hook"] == "on_record"] == read_jsonl(tmp_path / "run" / "metrics.jsonl")
    saved = [(e["folder"], e["record"]) for e in seen if e["hook"] == "on_checkpoint"]
    assert [name for name, _ in saved] == ["link-00000-step-0000002", "link-00001-step-0000003",
                                           "link-00001-step-0000004", "link-00002-step-0000006",
                                           "link-00002-step-0000008", "link-00003-step-0000009"]
    for name, rec in saved:  # mid-link: the step's own line (no made-up eval loss); else the link's
        mid = not name.endswith(("3", "6", "9"))
        assert rec["type"] == ("step" if mid else "link") and rec["step"] == int(name[-7:])
        assert ("eval_loss" in rec) != mid


@pytest.mark.slow
def test_mid_link_checkpoint_resumes_bitwise_equal(reference, tmp_path, small_data):
    """checkpoint.every_steps: a crash after step 5 resumes from step 4, inside link 2."""
    cfg = write_config(tmp_path / "c.yaml", tiny_config(small_data, tmp_path / "run", checkpoint={"every_steps": 2}))
    crashed = run_cli("train", str(cfg), faults(crash_at_step=5))
    assert crashed.returncode == 17, crashed.stderr
    latest = find_latest(tmp_path / "run")
    assert latest.name == "link-00001-step-0000004"  # link 2 (index 1), 1 of its 3 steps done
    assert any(k.startswith("current.") for k in checkpoint_tensors(latest))
    resumed = run_cli("train", str(cfg), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    a, b = chain_tensors(reference), chain_tensors(tmp_path / "run")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    assert step_losses(tmp_path / "run") == step_losses(reference)


@pytest.mark.slow
def test_activation_checkpointing_run_resumes_bitwise_and_matches_the_plain_run(reference, tmp_path, small_data):
    cfg = write_config(tmp_path / "c.yaml", tiny_config(small_data, tmp_path / "run",
                                                       train={"activation_checkpointing": True}))
    assert main(["train", str(cfg), f"run.dir={tmp_path / 'whole'}"]) == 0
    crashed = run_cli("train", str(cfg), faults(crash_at_step=5))
    assert crashed.returncode == 17, crashed.stderr
    resumed = run_cli("train", str(cfg), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    a, b = chain_tensors(tmp_path / "whole"), chain_tensors(tmp_path / "run")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)  # resume: bitwise
    assert step_losses(tmp_path / "run") == step_losses(tmp_path / "whole")
    ref = chain_tensors(reference)  # and recomputation changed nothing but memory
    assert all(torch.allclose(ref[k], a[k], rtol=1e-5, atol=1e-7) for k in ref)
