"""What the run leaves behind when something goes wrong: each case failed before its fix
(#28, "small leaks")."""

from __future__ import annotations

import errno
import logging
import os
import shutil
from pathlib import Path

import pytest

from raclora_dist.checkpoint.folder import find_latest, install_checkpoint, save_checkpoint, verify_checkpoint
from raclora_dist.config import ConfigError, build_config
from raclora_dist.core import ChainState
from raclora_dist.data.tokenizer import byte_tokenizer
from tests.helpers import tiny_config


def checkpoint(run: Path, step: int) -> Path:
    return save_checkpoint(run, ChainState(), {"next_link": step, "global_step": step}, keep=10,
                           write_state=lambda f: (f / "state.bin").write_bytes(b"state"))


def test_install_refuses_a_checkpoint_holding_a_symbolic_link(tmp_path):
    """A link in storage would have the copy (and its digests) read any file on the node."""
    src = checkpoint(tmp_path / "storage", 1)
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the run folder")
    (src / "state.bin").unlink()
    (src / "state.bin").symlink_to(secret)
    assert any("symbolic link" in p for p in verify_checkpoint(src))
    with pytest.raises(ConfigError, match=r"symbolic links \(state.bin\)"):
        install_checkpoint(src, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists() or find_latest(tmp_path / "run") is None


def test_the_checkpoint_latest_in_ray_storage_is_the_newest_intact_one(tmp_path, small_data):
    from raclora_dist.orchestration.ray_train import latest_in_storage

    storage = tmp_path / "storage"
    for step in (1, 2):
        shutil.copytree(checkpoint(tmp_path / "runs", step), storage / "r" / f"checkpoint_00000{step}")
    (storage / "r" / "checkpoint_000002" / "state.bin").write_bytes(b"torn")  # a partial upload
    (storage / "r" / "checkpoint_000003").mkdir()
    (storage / "r" / "checkpoint_000003" / "meta.json").write_text("{not json")
    for path, want in ((str(storage), str(storage / "r" / "checkpoint_000001")),
                       (storage.as_uri(), storage.as_uri() + "/r/checkpoint_000001")):  # an object store
        cfg = build_config(tiny_config(small_data, tmp_path / "run",
                                       ray={"enabled": True, "storage_path": path, "name": "r"}))
        assert latest_in_storage(cfg) == want


def test_a_failed_prune_is_said_not_swallowed(tmp_path, monkeypatch, caplog):
    """Checkpoints that cannot be removed fill the disk; the run goes on but says so."""
    run = tmp_path / "run"
    for step in (1, 2):
        checkpoint(run, step)
    real_unlink = os.unlink

    def refuse(path, *args, **kwargs):
        if str(path).endswith("state.bin"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", refuse)
    with caplog.at_level(logging.WARNING):
        save_checkpoint(run, ChainState(), {"next_link": 3, "global_step": 3}, keep=1,
                        write_state=lambda f: (f / "state.bin").write_bytes(b"state"))
    said = [r.getMessage() for r in caplog.records if "could not remove old checkpoint" in r.getMessage()]
    assert len(said) == 2 and all("Permission denied" in m for m in said), said
    assert find_latest(run).name == "link-00003-step-0000003"


def test_a_token_cache_that_cannot_be_stored_names_the_folder(tmp_path, small_data, monkeypatch):
    """A failed rename (disk full, permissions) surfaced later as a confusing read error."""
    from raclora_dist.data import token_cache

    cfg = cached_config(tmp_path, small_data)

    def full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(token_cache.os, "rename", full)
    with pytest.raises(ConfigError, match=r"data.cache_dir: could not store the tokenized data in .*No space left"):
        token_cache.cached_blocks(cfg.data, byte_tokenizer(), write=_write_ids)
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()], "half-written cache files left"


def test_an_unfinished_token_cache_entry_is_replaced(tmp_path, small_data):
    from raclora_dist.data import token_cache

    cfg = cached_config(tmp_path, small_data)
    entry = token_cache.cache_root(cfg.data) / token_cache.cache_key(cfg.data, byte_tokenizer())
    entry.mkdir(parents=True)
    (entry / "junk.bin").write_bytes(b"x")  # no meta.json: not an entry
    got = token_cache.cached_blocks(cfg.data, byte_tokenizer(), write=_write_ids)
    assert got["train"]["input_ids"].tolist() == _ids().tolist()


def cached_config(tmp_path: Path, data: Path):
    cfg = tiny_config(data, tmp_path / "run")
    cfg["data"]["cache_dir"] = str(tmp_path / "cache")
    return build_config(cfg)


def _write_ids(folder: Path) -> dict:
    from raclora_dist.data import token_cache

    return token_cache.write_tensors(folder, {"train": {"input_ids": _ids()}})


def _ids():
    import torch

    return torch.arange(12, dtype=torch.int32).view(3, 4)
