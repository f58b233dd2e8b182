"""Where a pretrained model comes from: a local folder, a Hugging Face Hub name resolved from
a cache laid out as ``huggingface_hub`` lays it out (offline: no network here), and a folder
in object storage (a ``file://`` URI through pyarrow) all train the same model to the same
chain."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from raclora_dist.checkpoint.folder import chain_tensors, find_latest
from tests.helpers import TINY_MODEL, run_cli, tiny_config, write_config

pytestmark = pytest.mark.slow

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A config-built tiny Llama saved as a sharded safetensors folder with its tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from raclora_dist.data.tokenizer import byte_tokenizer

    folder = tmp_path_factory.mktemp("pretrained") / "tiny"
    cfg = dict(TINY_MODEL)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg))
    model.save_pretrained(folder, max_shard_size="100KB")
    byte_tokenizer().save_pretrained(folder)
    assert (folder / "model.safetensors.index.json").is_file()
    return folder


def hub_cache(home: Path, repo: str, files: dict[str, bytes], kind: str = "models") -> None:
    """Lays ``files`` (repository path -> bytes) out in ``home`` as the Hub cache holds a
    downloaded repository: content-addressed blobs, a snapshot of symbolic links per commit,
    refs/main -> the commit."""
    root = home / "hub" / f"{kind}--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(COMMIT)
    for rel, data in files.items():
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = root / "snapshots" / COMMIT / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, pretrained, small_data):
    d = tmp_path_factory.mktemp("sources")
    cfg = tiny_config(small_data, d / "unused")
    cfg["model"] = {"name_or_path": str(pretrained), "dtype": "float32"}
    del cfg["data"]["tokenizer"]  # the model's own
    path = write_config(d / "c.yaml", cfg)
    home = d / "hf"
    hub_cache(home, "raclora-test/tiny", {f.name: f.read_bytes() for f in sorted(pretrained.iterdir())})
    # a dataset repository as the Hub lays one out: its data under data/, a README beside it
    hub_cache(home, "raclora-test/docs", {"data/train-00000-of-00001.jsonl": small_data.read_bytes(),
                                          "README.md": b"# docs\n"}, kind="datasets")
    env = {"HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "RACLORA_MODEL_CACHE": str(d / "models")}
    return d, path, env


def train(d: Path, cfg: Path, env: dict, name: str, source: str):
    run = d / name
    proc = run_cli("train", str(cfg), f"run.dir={run}", f"model.name_or_path={source}", env=env)
    return run, proc


def test_a_path_a_hub_name_and_an_object_store_uri_train_the_same_chain(runs, pretrained):
    d, cfg, env = runs
    chains = {}
    for name, source in (("path", str(pretrained)), ("hub", "raclora-test/tiny"),
                         ("hub-revision", f"raclora-test/tiny@{COMMIT}"), ("uri", pretrained.as_uri())):
        run, proc = train(d, cfg, env, name, source)
        assert proc.returncode == 0, proc.stderr[-3000:]
        chains[name] = chain_tensors(find_latest(run))
    ref = chains.pop("path")
    for name, chain in chains.items():
        assert chain.keys() == ref.keys() and all(torch.equal(chain[k], ref[k]) for k in ref), name
    # the object-store copy was fetched once into the model cache, sizes recorded
    (fetched,) = [p for p in (d / "models").iterdir() if not p.name.startswith(".")]
    listed = json.loads((fetched / ".raclora-fetched.json").read_text())
    assert listed["model.safetensors.index.json"] == (pretrained / "model.safetensors.index.json").stat().st_size
    assert {p.name for p in pretrained.iterdir()} <= set(listed)


def test_a_hub_dataset_trains_as_its_local_file_does(runs, pretrained, small_data):
    d, cfg, env = runs
    chains = []
    for name, data in (("data-path", str(small_data)), ("data-hub", "raclora-test/docs")):
        run = d / name
        proc = run_cli("train", str(cfg), f"run.dir={run}", f"model.name_or_path={pretrained}", f"data.path={data}",
                       env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        chains.append(chain_tensors(find_latest(run)))
    assert chains[0].keys() == chains[1].keys() and all(torch.equal(chains[0][k], chains[1][k]) for k in chains[0])


def test_a_name_missing_from_the_cache_offline_is_named_with_the_cache(runs, tmp_path):
    d, cfg, env = runs
    _run, proc = train(d, cfg, env, "missing", "raclora-test/absent")
    assert proc.returncode == 2
    assert "model.name_or_path: 'raclora-test/absent' is not in the Hugging Face cache" in proc.stderr
    assert str(Path(env["HF_HOME"]) / "hub") in proc.stderr and "HF_HUB_OFFLINE" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_validate_says_where_the_weights_come_from_without_downloading_them(runs, pretrained, tmp_path):
    _d, cfg, env = runs
    proc = run_cli("validate", str(cfg), "model.name_or_path=raclora-test/tiny", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "model.name_or_path: raclora-test/tiny (revision main) from the Hugging Face Hub, cached at" in proc.stdout
    # an object-store folder: validate fetches the config and tokenizer, not the weights
    fresh = {**env, "RACLORA_MODEL_CACHE": str(tmp_path / "models")}
    proc = run_cli("validate", str(cfg), f"model.name_or_path={pretrained.as_uri()}", env=fresh)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"model.name_or_path: {pretrained.as_uri()} from object storage" in proc.stdout
    fetched = {p.name for p in (tmp_path / "models").glob("*/*")}
    assert "config.json" in fetched and not any(n.endswith(".safetensors") for n in fetched)
