"""The shipped configs: each validates, and a shortened quickstart run learns."""

from pathlib import Path

import pytest

from raclora_dist.cli import main
from tests.helpers import ROOT, read_jsonl, run_cli

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_every_shipped_config_validates_and_says_how_to_launch(config: Path, corpus, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert config.read_text().startswith("#"), "each config starts with a comment on how to launch it"
    assert main(["validate", str(config)]) == 0


@pytest.mark.slow
def test_shortened_quickstart_lowers_the_eval_loss(tmp_path, corpus):
    """The demo's own path: embedded local Ray, 2 FSDP2 workers (only shortened)."""
    run = tmp_path / "qs"
    proc = run_cli("train", "configs/quickstart.yaml", f"run.dir={run}", "raclora.links=2",
                   "raclora.steps_per_link=15", "train.warmup_steps=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list((run / "ray").rglob("checkpoint_*/meta.json")), "no checkpoint in Ray storage"
    recs = read_jsonl(run / "metrics.jsonl")
    start = next(r["eval_loss"] for r in recs if r["type"] == "eval")
    end = [r for r in recs if r["type"] == "link"][-1]["eval_loss"]
    assert end < start - 0.5, (start, end)
    # a short report: a start line, the eval before, the start-up, one line per link, a summary
    out = (proc.stdout + proc.stderr).splitlines()
    assert len(out) <= 12, "\n".join(out)
    for link in (1, 2):
        assert sum(line.startswith(f"link {link}/2 ") for line in out) == 1, "\n".join(out)
    assert out[0].startswith("training llama from config") and "fsdp2 x 2 under an embedded Ray" in out[0]
    assert any(line.startswith("done: 2/2 links") for line in out)
    assert not any("PlacementGroupCleaner" in line or "RayTrainWorker" in line for line in out)
