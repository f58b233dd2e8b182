"""A corpus much larger than the memory its tokenization may use: built in a stream under a
cap on the building process's private memory, then trained from (the cache is reused)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from benchmarks.token_cache import corpus
from tests.helpers import read_jsonl, run_cli, subprocess_env, tiny_config, write_config

pytestmark = pytest.mark.slow

CAP_MIB = 160  # the build's private memory; the in-memory build took ~130 bytes a token (6 GiB here)

BUILD = r"""
import json, resource, sys, threading, time
from pathlib import Path
from raclora_dist.config import load_config
from raclora_dist.logs import console

console()  # the "tokenized ..." line on stdout, as the command line shows it

def status(field):
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1]) / 1024

from raclora_dist.data.batches import write_blocks
from raclora_dist.data.token_cache import cached_blocks
from raclora_dist.data.tokenizer import load_tokenizer, tokenizer_source

cfg = load_config(sys.argv[1])
tok = load_tokenizer(tokenizer_source(cfg))
from raclora_dist.data.rows import load_rows
load_rows(cfg.data, cfg.data.paths[0])  # datasets' Arrow conversion, before the capped build
peak, anon0 = [0.0], status("RssAnon")
def sample():
    while True:
        peak[0] = max(peak[0], status("RssAnon")); time.sleep(0.02)
threading.Thread(target=sample, daemon=True).start()

def capped(folder):  # the build alone under the cap (the entry is then read as a copy-on-write map)
    limit = int((status("VmData") + float(sys.argv[2])) * 2**20)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, resource.RLIM_INFINITY))
    try:
        return write_blocks(cfg.data, tok, folder)
    finally:
        resource.setrlimit(resource.RLIMIT_DATA, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))

sets = cached_blocks(cfg.data, tok, capped)
print(json.dumps({"sequences": len(sets["train"]["input_ids"]), "peak_anon_above_mib": peak[0] - anon0}))
"""


def test_a_corpus_larger_than_the_builds_memory_cap_tokenizes_and_trains(tmp_path):
    data = corpus(tmp_path / "big.jsonl", 48)  # ~50 M byte tokens
    cfg = tiny_config(data, tmp_path / "run", raclora={"links": 1, "steps_per_link": 2},
                      train={"batch_size": 4, "eval_batches": 1, "warmup_steps": 0})
    cfg["data"].update(seq_len=64, cache_dir=str(tmp_path / "cache"), eval_fraction=0.001)
    path = write_config(tmp_path / "c.yaml", cfg)
    proc = subprocess.run([sys.executable, "-c", BUILD, str(path), str(CAP_MIB)], capture_output=True, text=True,
                          env=subprocess_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "tokenized" in proc.stdout
    built = json.loads(proc.stdout.strip().splitlines()[-1])
    assert built["sequences"] * 64 > 45e6 and built["peak_anon_above_mib"] < CAP_MIB, built

    proc = run_cli("train", str(path), env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "tokenized" not in proc.stdout + proc.stderr  # the capped build's entry, mapped
    assert len([r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["type"] == "link"]) == 1
