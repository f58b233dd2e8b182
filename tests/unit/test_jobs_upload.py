"""What `raclora submit` uploads: Ray's own traversal (with .gitignore), plus the files the
config needs that it would leave out (real Ray packaging code; no cluster needed)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from raclora_dist.config import ConfigError
from raclora_dist.orchestration.jobs import stage_upload, uploaded_files
from tests.helpers import ROOT, tiny_config


def project(tmp_path: Path, small_data: Path, **model) -> Path:
    root = tmp_path / "proj"
    (root / "data").mkdir(parents=True)
    (root / "data" / "train.jsonl").write_text(small_data.read_text())
    (root / ".gitignore").write_text("/data/*.jsonl\nsecret.env\nmodels/\n")
    (root / "secret.env").write_text("TOKEN=x\n")
    (root / ".venv" / "lib").mkdir(parents=True)
    (root / ".venv" / "lib" / "big.so").write_text("x")
    (root / "src.py").write_text("print(1)\n")
    cfg = tiny_config(Path("data/train.jsonl"), Path("runs/job"))
    cfg["model"].update(model)
    if "name_or_path" in model:
        cfg["model"].pop("config")
    (root / "job.yaml").write_text(yaml.safe_dump(cfg))
    return root


def test_ignored_data_is_added_to_a_filtered_copy(tmp_path, small_data, monkeypatch):
    root = project(tmp_path, small_data)
    monkeypatch.chdir(root)
    assert (root / "data" / "train.jsonl").resolve() not in uploaded_files(root)  # what Ray alone would send
    stage = tmp_path / "stage"
    stage.mkdir()
    upload, added = stage_upload(root, "job.yaml", [], stage)
    assert upload == stage and added == ["data/train.jsonl"]
    sent = {str(p.relative_to(stage)) for p in stage.rglob("*") if p.is_file()}
    assert sent == {"data/train.jsonl", "job.yaml", "src.py"}  # no secret, no venv, no ignore files
    assert (stage / "data" / "train.jsonl").read_text() == small_data.read_text()


def test_nothing_is_staged_when_ray_uploads_everything_needed(tmp_path, small_data, monkeypatch):
    root = project(tmp_path, small_data)
    (root / ".gitignore").write_text("secret.env\n")
    monkeypatch.chdir(root)
    assert stage_upload(root, "job.yaml", [], tmp_path) == (root, [])


def test_an_ignored_model_folder_or_a_path_outside_is_refused(tmp_path, small_data, monkeypatch):
    root = project(tmp_path, small_data, name_or_path="models/llama")
    (root / "models" / "llama").mkdir(parents=True)
    (root / "models" / "llama" / "config.json").write_text("{}")
    monkeypatch.chdir(root)
    with pytest.raises(ConfigError, match=r"model.name_or_path: 'models/llama' is left out .*absolute path"):
        stage_upload(root, "job.yaml", [], tmp_path)
    with pytest.raises(ConfigError, match=r"data.path: '\.\./elsewhere.jsonl' is outside the working directory"):
        stage_upload(root, "job.yaml", ["model.config={model_type: llama}", "model.name_or_path=null",
                                        "data.path=../elsewhere.jsonl"], tmp_path)
    # an absolute path is the cluster's business: passed through, only the data is added
    stage = tmp_path / "stage"
    stage.mkdir()
    assert stage_upload(root, "job.yaml", ["model.name_or_path=/cluster/models/llama"], stage) == (
        stage, ["data/train.jsonl"])


def test_the_readme_submit_command_uploads_the_bundled_data(tmp_path, corpus, monkeypatch):
    """`raclora submit configs/quickstart.yaml` from the repository folder, as the README says."""
    monkeypatch.chdir(ROOT)
    upload, added = stage_upload(ROOT, "configs/quickstart.yaml", [], tmp_path)
    assert added == ["data/stdlib_docstrings.jsonl"]
    assert (upload / "configs" / "quickstart.yaml").is_file() and (upload / "raclora_dist" / "cli.py").is_file()
    assert not (upload / ".venv").exists() and not (upload / ".git").exists()
