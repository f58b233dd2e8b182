"""Bad input: a clear error naming the field, exit code 2, and no run folder damaged."""


import pytest

from raclora_dist.cli import main
from tests.helpers import run_cli, snapshot, tiny_config, write_config


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, small_data):
    d = tmp_path_factory.mktemp("good")
    cfg = write_config(d / "c.yaml", tiny_config(small_data, d / "run", raclora={"links": 1}))
    assert main(["train", str(cfg)]) == 0
    return cfg, d / "run"


CASES = {
    "broken_yaml": ([], "invalid YAML at line"),
    "unknown_field": (["raclora.rankk=4"], "raclora.rankk: unknown field"),
    "rank_too_large": (["raclora.rank=64", "raclora.sketch_side=right"], "raclora.rank=64: rank 64 exceeds"),
    "missing_data": (["data.path=/no/such.jsonl"], "data.path: '/no/such.jsonl' does not exist"),
    "unmatched_target": (["raclora.target_modules=[qkv]"], "'qkv' matched no module; candidates: q_proj"),
    "fresh_run_over_checkpoint": ([], "already holds a checkpoint; pass --resume"),
    "resume_with_other_seed": (["raclora.seed=5", "--resume"], "raclora.seed: run has 0, config has 5"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_named_and_loses_nothing(case, finished_run, tmp_path, capsys):
    cfg, run = finished_run
    before = snapshot(run)
    overrides, expected = CASES[case]
    path = cfg
    if case == "broken_yaml":
        path = tmp_path / "broken.yaml"
        path.write_text(cfg.read_text().replace("model:", "model: [", 1))
    args = ["train", str(path), *[o for o in overrides if o != "--resume"]]
    if "--resume" in overrides:
        args.append("--resume")
    assert main(args) == 2
    assert expected in capsys.readouterr().err
    assert snapshot(run) == before


def test_validate_command(finished_run, capsys):
    cfg, _ = finished_run
    assert main(["validate", str(cfg)]) == 0
    assert "valid (8 layers targeted" in capsys.readouterr().out
    assert main(["validate", str(cfg), "raclora.target_modules=[nope]"]) == 2


@pytest.mark.parametrize("launcher", ["torchrun", "ray"])
@pytest.mark.parametrize("case", ["resume_without_checkpoint", "fresh_run_over_a_checkpoint", "other_config"])
def test_launching_process_refuses_a_bad_start_before_any_worker(launcher, case, finished_run, tmp_path):
    """Under torchrun and Ray the launching command checks the run folder itself: exit 2 with
    one line, no worker (and no Ray) started, no traceback, nothing written."""
    cfg, run = finished_run
    target = {"resume_without_checkpoint": tmp_path / "empty", "fresh_run_over_a_checkpoint": run,
              "other_config": run}[case]
    args = ["train", str(cfg), f"run.dir={target}", "distributed.strategy=ddp", "distributed.workers=2",
            f"ray.enabled={'true' if launcher == 'ray' else 'false'}"]
    if case == "other_config":
        args.append("train.lr=0.5")
    if case != "fresh_run_over_a_checkpoint":
        args.append("--resume")
    before = snapshot(run)
    proc = run_cli(*args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[0].startswith("raclora: error: ") and "Traceback" not in proc.stderr
    expected = {"resume_without_checkpoint": "--resume: no complete checkpoint",
                "fresh_run_over_a_checkpoint": "already holds a checkpoint",
                "other_config": "train.lr"}[case]
    assert expected in proc.stderr
    assert "torch.distributed" not in proc.stderr and "Ray" not in proc.stderr.replace("Ray storage", "")
    assert snapshot(run) == before and not (tmp_path / "empty").exists()
