"""Damaged checkpoints: each case gets a clear message and never a traceback. Where an older
intact checkpoint exists the run resumes from it (saying what was damaged) and ends where an
uninterrupted run ends; where none does, it stops with exit 2 and the folder is untouched."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from raclora_dist.checkpoint.folder import chain_tensors, find_latest
from raclora_dist.cli import main
from tests.helpers import snapshot, tiny_config, write_config

NEWEST, OLDER = "link-00003-step-0000009", "link-00002-step-0000006"


@pytest.fixture(scope="module")
def finished(tmp_path_factory, small_data):
    """A finished 3-link run (checkpoints after links 2 and 3 kept) and its config."""
    d = tmp_path_factory.mktemp("corpus")
    cfg = write_config(d / "c.yaml", tiny_config(small_data, d / "run"))
    assert main(["train", str(cfg)]) == 0
    return cfg, d / "run"


def damaged_copy(ref: Path, tmp_path: Path, damage) -> Path:
    """A copy of the finished run folder with ``damage`` applied to it (the original stays intact)."""
    run = tmp_path / "run"
    shutil.copytree(ref, run)
    damage(run)
    return run


def truncate(run: Path, name: str, rel: str) -> None:
    f = run / "checkpoints" / name / rel
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def zero(run: Path, name: str, rel: str) -> None:
    (run / "checkpoints" / name / rel).write_bytes(b"")


def delete(run: Path, name: str, rel: str) -> None:
    target = run / "checkpoints" / name / rel
    shutil.rmtree(target) if target.is_dir() else target.unlink()


FALLBACK = {  # damage the newest checkpoint only: resume from the older one
    "truncated_chain": (lambda r: truncate(r, NEWEST, "links/link-00002.safetensors"), "links/link-00002.safetensors"),
    "empty_optimizer": (lambda r: zero(r, NEWEST, "optimizer.pt"), "optimizer.pt: 0 bytes"),
    "meta_names_a_missing_file": (lambda r: delete(r, NEWEST, "rng.pt"), "rng.pt: missing"),
    "latest_points_to_a_deleted_folder": (lambda r: delete(r, NEWEST, ""), None),
    "garbled_meta": (lambda r: (r / "checkpoints" / NEWEST / "meta.json").write_text("{\"format\": 1, "), "meta.json"),
}


@pytest.mark.parametrize("case", list(FALLBACK))
def test_a_damaged_latest_checkpoint_resumes_from_the_newest_intact_one(case, finished, tmp_path, capsys):
    cfg, ref = finished
    damage, named = FALLBACK[case]
    run = damaged_copy(ref, tmp_path, damage)
    assert find_latest(run).name == OLDER
    assert main(["train", str(cfg), f"run.dir={run}", "--resume"]) == 0  # redoes link 3 from link 2's checkpoint
    out = capsys.readouterr()
    if named is not None:
        assert f"checkpoint {NEWEST} is damaged" in out.out + out.err and named in out.out + out.err
    a = chain_tensors(ref / "checkpoints" / NEWEST)
    b = chain_tensors(find_latest(run))
    assert find_latest(run).name == NEWEST and a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def damage_all(run: Path) -> None:
    truncate(run, NEWEST, "links/link-00002.safetensors")
    zero(run, OLDER, "rng.pt")


def foreign_checkpoint(run: Path) -> None:
    """A checkpoint copied in from a run of another config (other target modules)."""
    meta_path = run / "checkpoints" / NEWEST / "meta.json"
    import yaml

    c = yaml.safe_load((run / "checkpoints" / NEWEST / "config.yaml").read_text())
    c["raclora"]["target_modules"] = ["q_proj"]
    text = yaml.safe_dump(c)
    (run / "checkpoints" / NEWEST / "config.yaml").write_text(text)
    meta = json.loads(meta_path.read_text())  # re-list the edited file, as that run would have written it
    meta["files"]["config.yaml"] = [len(text.encode()), hashlib.sha256(text.encode()).hexdigest()]
    meta_path.write_text(json.dumps(meta))


STOP = {
    "every_checkpoint_damaged": (damage_all, "every checkpoint in run folder"),
    "checkpoint_of_another_config": (foreign_checkpoint, f"differs from that of checkpoint {NEWEST}"),
}


@pytest.mark.parametrize("case", list(STOP))
def test_no_usable_checkpoint_stops_with_a_clear_error_and_touches_nothing(case, finished, tmp_path, capsys):
    cfg, ref = finished
    damage, message = STOP[case]
    run = damaged_copy(ref, tmp_path, damage)
    before = snapshot(run)
    assert main(["train", str(cfg), f"run.dir={run}", "--resume"]) == 2  # a ConfigError, not a traceback
    err = capsys.readouterr().err
    assert err.startswith("raclora: error: ") and message in err
    assert snapshot(run) == before


def test_export_of_a_damaged_run_names_the_file(finished, tmp_path, capsys):
    _, ref = finished
    run = damaged_copy(ref, tmp_path, damage_all)
    assert main(["export", str(run), "--format", "peft"]) == 2
    err = capsys.readouterr().err
    assert f"{NEWEST} is damaged: links/link-00002.safetensors" in err and f"{OLDER} is damaged: rng.pt: 0 bytes" in err
