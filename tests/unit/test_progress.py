"""The driver's console under the embedded Ray, from metrics.jsonl: each link line once (also when a
resumed run rewrites the file), the warnings that matter, and the summary."""

from __future__ import annotations

import json
import os

from raclora_dist.config import build_config
from raclora_dist.observe.metrics import landed_warning
from raclora_dist.observe.progress import Follower
from tests.helpers import TINY_MODEL


def link(i, landed=1.0):
    return {"type": "link", "link": i, "step": 3 * (i + 1), "merged": True, "train_loss": 2.0, "eval_loss": 3.0 - i,
            "link_time_s": 1.0, "update_norm": 1.0, "merge_time_s": 0.01, "landed_fraction": landed,
            "landed_cosine": 0.9}


def follower(run_dir) -> tuple[Follower, list[str]]:
    """A Follower of a 3-link run in ``run_dir`` and the lines it prints."""
    cfg = build_config({"run": {"dir": str(run_dir)}, "model": {"config": dict(TINY_MODEL)},
                        "data": {"path": "x.jsonl", "seq_len": 32},
                        "raclora": {"links": 3, "steps_per_link": 3}, "train": {"batch_size": 4}})
    out: list[str] = []
    return Follower(cfg, emit=out.append, bar=False), out


def test_follower_prints_each_link_once_and_the_warnings(tmp_path):
    f, out = follower(tmp_path)
    path = tmp_path / "metrics.jsonl"

    def write(recs, replace=False):
        text = "".join(json.dumps(r) + "\n" for r in recs)
        if replace:  # as truncate_after does: a new file moved into place
            (tmp_path / "m.tmp").write_text(text)
            os.replace(tmp_path / "m.tmp", path)
        else:
            with path.open("a") as fh:
                fh.write(text)
        f.poll()

    write([{"type": "eval", "step": 0, "eval_loss": 6.0}, link(0), link(1, landed=0.4)])
    write([link(0)], replace=True)  # a restarted group cut the file back to link 0's checkpoint...
    write([{"type": "resume", "link": 1, "step": 3}, link(1), link(2)])  # ...and trained on
    assert out[0] == "eval_loss before training: 6.0000"
    assert [line.split()[1] for line in out if line.startswith("link ")] == ["1/3", "2/3", "3/3"]
    assert sum("only 40.0% of the intended update landed" in line for line in out) == 1
    assert sum(line.startswith("resumed at link 2 (step 3)") for line in out) == 1
    assert "tokens/s 384" in out[1]  # 4 x 32 tokens x 3 steps in 1 s
    assert f.summary(75).startswith("done: 3/3 links in 1m15s, eval_loss 6.0000 -> 1.0000")


def test_no_landed_warning_when_the_layers_keep_a_master_copy():
    """A master carries what one link's rounding left out to the next merge: one link's low
    fraction is not a loss, and the warning's advice (keep a master) is already followed."""
    assert "raclora.master_weights=cpu" in landed_warning(link(0, landed=0.64))
    assert landed_warning({**link(0, landed=0.64), "master_weights": True}) is None
    assert landed_warning({**link(0, landed=0.64), "master_weights": False}) is not None


def test_a_capped_chain_notes_its_cap_once_and_names_the_budget():
    """A recompression (discarded energy > 0) keeps less of each link by design: the note says so
    once, names raclora.chain_budget, and does not blame rounding to the base's precision."""
    capped = [{**link(t, landed=f), "discarded_energy": 0.1} for t, f in enumerate([0.95, 0.85, 0.8, 0.7])]
    notes = [landed_warning(rec, capped[t - 1] if t else None) for t, rec in enumerate(capped)]
    assert notes[0] is None and notes[2] is None and notes[3] is None
    assert "raclora.chain_budget" in notes[1] and "85.0%" in notes[1] and "to nearest" not in notes[1]
    assert "to nearest" in landed_warning(link(1, landed=0.85), link(0, landed=0.85))  # rounding: every link


def test_follower_prints_a_resized_group_once(tmp_path):
    f, out = follower(tmp_path)
    rec = {"type": "resize", "link": 1, "step": 3, "from_workers": 2, "to_workers": 1}
    for _ in range(2):
        with (tmp_path / "metrics.jsonl").open("a") as fh:
            fh.write(json.dumps(rec) + "\n")
        f.poll()
    assert out == ["workers: 2 -> 1, resumed at link 2 from the latest checkpoint (the same global batch, split over "
                   "the new group)"]
