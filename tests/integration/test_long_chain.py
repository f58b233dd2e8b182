"""A long chain costs what its first links cost (#27): 32 links of a factored chain under its
budget hold a fixed number of chain elements, write one link's file per link, keep no merged
link in RAM past a checkpoint (and the rank's RSS flat), and resume bitwise from a crash at link 20."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from raclora_dist.checkpoint.folder import chain_tensors, find_latest, load_checkpoint
from raclora_dist.checkpoint.link_files import link_name
from raclora_dist.cli import main
from raclora_dist.config import load_config
from tests.helpers import faults, read_jsonl, run_cli, tiny_config, write_config

LINKS = 32
BUDGET = 0.3  # the tiny model's layers (32 x 32 .. 64 x 32) then cap at 3-6 columns, 2-3 links of r 2


def long_config(data: Path, run: Path, callbacks: list | None = None) -> dict:
    return tiny_config(
        data, run,
        raclora={"links": LINKS, "steps_per_link": 1, "merge_mode": "factored", "chain_budget": BUDGET},
        train={"warmup_steps": 0, "eval_batches": 1},
        checkpoint={"every_links": 1, "keep": LINKS + 1},  # keep all: each one's own bytes are counted
        run={"dir": str(run), "callbacks": callbacks or []},
    )


@pytest.fixture(scope="module")
def long_run(tmp_path_factory, small_data):
    d = tmp_path_factory.mktemp("long")
    probe = d / "chain.jsonl"
    cfg = write_config(d / "c.yaml", long_config(small_data, d / "run",
                                                 [{"class": "tests.probes:ChainSize", "args": {"out": str(probe)}}]))
    assert main(["train", str(cfg)]) == 0
    return d / "run", read_jsonl(probe)


def test_chain_elements_stay_at_the_budget_and_fill_up_once(long_run):
    run, rows = long_run
    cfg = load_config(run / "config.yaml")
    specs = load_checkpoint(find_latest(run)).layer_specs()
    caps = [cfg.raclora.chain_capacity(s.out_features, s.in_features) for s in specs]
    held = sum(c * (s.out_features + s.in_features) for c, s in zip(caps, specs, strict=False))
    assert held <= BUDGET * sum(s.out_features * s.in_features for s in specs)
    assert [r["link"] for r in rows] == list(range(LINKS))
    assert {r["chain_elements"] for r in rows} == {held}  # the same from link 1 to link 32
    assert rows[-1]["chain_ranks"] == caps and max(caps) < LINKS * cfg.raclora.rank  # full, and capped
    # after link 3 every layer is at its cap: later links are recompressed in, and the price is logged
    links = [r for r in read_jsonl(run / "metrics.jsonl") if r["type"] == "link"]
    assert all(r["merged"] and r["discarded_energy"] > 0 for r in links[4:])
    assert links[-1]["eval_loss"] < next(r["eval_loss"] for r in read_jsonl(run / "metrics.jsonl") if r["type"] == "eval")


def test_the_record_is_written_once_per_link_and_never_held_past_a_checkpoint(long_run):
    run, rows = long_run
    # At each boundary, before its checkpoint, RAM holds only the link just merged.
    assert all(r["in_ram"] == [r["link"]] for r in rows)
    # and the rank's RSS is flat from link 6 to link 32 (measured: +0.5 MiB, Python's records of
    # the run). This model's links are 4 KB each, so this bounds what the process keeps per link
    # in general (under 64 KiB per link over 26 links), beside the record's own ``in_ram``.
    assert rows[-1]["rss_mb"] - rows[5]["rss_mb"] < 26 * 64 / 1024, [r["rss_mb"] for r in rows]
    store = run / "checkpoints" / "chain"
    sizes = {(store / link_name(t)).stat().st_size for t in range(LINKS)}
    assert len(sizes) == 1  # one link's worth per link
    ckpts = sorted(p for p in (run / "checkpoints").glob("link-*"))
    assert len(ckpts) == LINKS
    own = []
    for ckpt in ckpts:
        linked = sorted((ckpt / "links").iterdir())
        assert len(linked) == json.loads((ckpt / "meta.json").read_text())["next_link"]
        # every link file is the store's file (a hard link: no byte written twice)
        assert all(os.stat(f).st_ino == os.stat(store / f.name).st_ino for f in linked)
        # what each checkpoint wrote of its own: optimizer and RNG state, config (the records
        # metrics.jsonl and meta.json grow by a line per step and per file)
        own.append(sum(f.stat().st_size for f in ckpt.rglob("*")
                       if f.is_file() and f.stat().st_nlink == 1 and f.name not in ("metrics.jsonl", "meta.json")))
    assert len(set(own)) == 1, own


@pytest.mark.slow
def test_a_crash_at_link_20_resumes_bitwise(long_run, tmp_path, small_data):
    reference, _ = long_run
    cfg = write_config(tmp_path / "c.yaml", long_config(small_data, tmp_path / "run"))
    crashed = run_cli("train", str(cfg), faults(crash_at_step=20))  # in link 20 (index 19), before its boundary
    assert crashed.returncode == 17, crashed.stderr
    assert find_latest(tmp_path / "run").name == "link-00019-step-0000019"
    resumed = run_cli("train", str(cfg), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    a, b = chain_tensors(find_latest(reference)), chain_tensors(find_latest(tmp_path / "run"))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    evals = [[r["eval_loss"] for r in read_jsonl(run / "metrics.jsonl") if r["type"] == "link"]
             for run in (reference, tmp_path / "run")]
    assert evals[0] == evals[1]  # the replayed, recompressed chain is the one training built
