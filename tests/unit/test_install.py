"""Installing a checkpoint from storage into a run folder that lost everything (a new node)."""

from pathlib import Path

from raclora_dist.checkpoint.folder import find_latest, install_checkpoint, save_checkpoint
from raclora_dist.core import ChainState


def test_install_into_an_empty_run_folder_points_latest_at_it_and_restores_the_records(tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.yaml").write_text("run: {}\n")
    (old / "metrics.jsonl").write_text('{"type": "eval", "step": 0}\n{"type": "link", "link": 0}\n')
    ckpt = save_checkpoint(old, ChainState(), {"next_link": 1, "global_step": 3}, keep=2, write_state=lambda _: None)
    (old / "metrics.jsonl").write_text((old / "metrics.jsonl").read_text() + '{"type": "step", "step": 4}\n')
    new = tmp_path / "new"  # the node's disk was lost: nothing there
    final = install_checkpoint(ckpt, new)
    assert final.name == "link-00001-step-0000003" == ckpt.name
    assert (new / "checkpoints" / "latest").read_text().strip() == final.name
    assert find_latest(new) == final
    # the records as they were at the checkpoint (the later step record is not in it)
    assert (new / "metrics.jsonl").read_text() == '{"type": "eval", "step": 0}\n{"type": "link", "link": 0}\n'
    assert (new / "config.yaml").read_text() == "run: {}\n"
    assert Path(final / "metrics.jsonl").is_file()


def test_install_replaces_metrics_left_behind_by_an_earlier_attempt_and_keeps_a_copy_that_goes_on(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"type": "link", "link": 0}\n{"type": "link", "link": 1}\n')
    ckpt = save_checkpoint(run, ChainState(), {"next_link": 2, "global_step": 6}, keep=2, write_state=lambda _: None)
    # This disk's copy stopped at link 0 (the run went on on another node); the checkpoint's wins.
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / "metrics.jsonl").write_text('{"type": "link", "link": 0}\n{"type": "step", "step": 4}\n')
    install_checkpoint(ckpt, stale)
    assert (stale / "metrics.jsonl").read_text() == (ckpt / "metrics.jsonl").read_text()
    # A copy that begins with the checkpoint's and goes on past it is this run's own: kept
    # (a resume truncates it at the checkpoint).
    going_on = (ckpt / "metrics.jsonl").read_text() + '{"type": "step", "step": 7}\n'
    ahead = tmp_path / "ahead"
    ahead.mkdir()
    (ahead / "metrics.jsonl").write_text(going_on)
    install_checkpoint(ckpt, ahead)
    assert (ahead / "metrics.jsonl").read_text() == going_on
    # Without records (another node's disk): the checkpoint only.
    other = tmp_path / "other"
    install_checkpoint(ckpt, other, records=False)
    assert find_latest(other) is not None and not (other / "metrics.jsonl").exists()
