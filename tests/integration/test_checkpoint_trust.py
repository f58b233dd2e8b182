"""A checkpoint is data: a pickle planted in any file a checkpoint holds is refused at resume,
with the file named, and the code it carries never runs (SECURITY.md).

The attacker here can write to checkpoint storage and rewrites ``meta.json``'s sizes and
digests to match (the SHA-256 list proves integrity, not origin).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from raclora_dist.checkpoint.folder import find_latest
from tests.helpers import run_cli, tiny_config, write_config

pytestmark = pytest.mark.slow

ZERO2 = ["distributed.strategy=deepspeed", "distributed.workers=2",
         "distributed.deepspeed={zero_optimization: {stage: 2}}"]


class Planted:
    """Unpickling this opens (creates) ``marker``: the planted code."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant(run: Path, rel: str, marker: Path) -> None:
    """Replaces ``rel`` in the run's latest checkpoint by a pickle that creates ``marker``
    when loaded, and rewrites the checkpoint's manifest so that the file looks intact."""
    ckpt = find_latest(run)
    target = ckpt / rel
    target.unlink()  # the checkpoint's files may be hard links shared with older ones
    torch.save({"state": {}, "payload": Planted(marker)}, target)
    meta = json.loads((ckpt / "meta.json").read_text())
    data = target.read_bytes()
    meta["files"][rel] = [len(data), hashlib.sha256(data).hexdigest()]
    (ckpt / "meta.json").write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, small_data):
    d = tmp_path_factory.mktemp("trust")
    cfg = write_config(d / "c.yaml", tiny_config(small_data, d / "unused", raclora={"links": 2}))
    out = {}
    for name, engine in (("single", []), ("zero2", ZERO2)):
        run = d / name
        proc = run_cli("train", str(cfg), f"run.dir={run}", *engine, env={"OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[name] = (cfg, run, engine)
    return out


def pickled_files(run: Path) -> list[str]:
    ckpt = find_latest(run)
    return sorted(f.relative_to(ckpt).as_posix() for f in ckpt.rglob("*.pt"))


def test_the_checkpoints_hold_the_files_this_test_plants_into(runs):
    """The list below must follow the formats: a new pickled file needs its own case."""
    assert pickled_files(runs["single"][1]) == ["optimizer.pt", "rng.pt"]
    assert pickled_files(runs["zero2"][1]) == [
        "deepspeed/state/mp_rank_00_model_states.pt",
        "deepspeed/state/zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "deepspeed/state/zero_pp_rank_1_mp_rank_00_optim_states.pt",
        "rng.pt",
    ]


@pytest.mark.parametrize("engine, rel", [
    ("single", "optimizer.pt"),
    ("single", "rng.pt"),
    ("zero2", "deepspeed/state/mp_rank_00_model_states.pt"),
    ("zero2", "deepspeed/state/zero_pp_rank_0_mp_rank_00_optim_states.pt"),
    ("zero2", "deepspeed/state/zero_pp_rank_1_mp_rank_00_optim_states.pt"),
])
def test_resume_refuses_a_planted_pickle_naming_the_file_and_never_runs_it(runs, engine, rel, tmp_path):
    cfg, finished, overrides = runs[engine]
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    marker = tmp_path / "planted-code-ran"
    plant(run, rel, marker)
    proc = run_cli("train", str(cfg), f"run.dir={run}", *overrides, "raclora.links=3", "--resume",
                   env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0
    assert not marker.exists(), "the planted pickle ran"
    err = proc.stderr
    assert rel.split("/")[-1] in err and "refused" in err, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
