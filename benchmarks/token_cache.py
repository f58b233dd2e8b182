"""Building the tokenized cache: peak memory and time against the corpus size, streamed
(:func:`raclora_dist.data.batches.write_blocks`) against the former in-memory build.

Each build runs in a fresh process on a generated JSONL corpus (documents of pseudo-random
words) with the byte tokenizer (one token per byte: the most tokens per byte of text), and
reports the process's peak RSS above its RSS before the build (file pages it read included:
datasets' memory-mapped Arrow rows count there, and the kernel may drop them at will), its
peak private memory (RssAnon, sampled) above where it stood, and the seconds per million
tokens. With ``--cap-mib`` the streamed build runs under that limit on its private memory
(``RLIMIT_DATA`` above the process's data size before the build: heap and anonymous maps,
not the files it maps read-only): a build that needed more would fail.

Usage::

    python -m benchmarks.token_cache --sizes-mib 16 64 256 --json benchmarks/results/token_cache.json

The in-memory build is run only up to ``--inmemory-max-mib`` (it holds every token as a
Python int, about 40 bytes each).
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
from pathlib import Path
from raclora_dist.config import build_config
from raclora_dist.data.tokenizer import byte_tokenizer

def status(field):
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1]) / 1024

import threading
peak_anon = [0.0]
def sample():  # RssAnon has no high-water mark: sample it
    while True:
        peak_anon[0] = max(peak_anon[0], status("RssAnon"))
        time.sleep(0.02)
corpus, out, mode, cap = sys.argv[1], Path(sys.argv[2]), sys.argv[3], float(sys.argv[4])
cfg = build_config({"model": {"config": {"model_type": "llama"}}, "data": {"path": corpus, "tokenizer": "bytes",
                    "seq_len": 512, "cache_dir": str(out)}})
tok = byte_tokenizer()
from raclora_dist.data import batches as data
from raclora_dist.data.rows import load_rows
load_rows(cfg.data, corpus)  # datasets' Arrow conversion of the JSONL: before the measured build
Path("/proc/self/clear_refs").write_text("5")
before, data_mib, anon_before = status("VmRSS"), status("VmData"), status("RssAnon")
threading.Thread(target=sample, daemon=True).start()
if cap > 0:  # RLIMIT_DATA: private writable memory (heap, anonymous maps), not files mapped read-only
    limit = int((data_mib + cap) * 2**20)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
t0 = time.perf_counter()
if mode == "streamed":
    shapes = data.write_blocks(cfg.data, tok, out)
    tokens = shapes["train.input_ids"][0] * shapes["train.input_ids"][1]
else:
    sets = data.tokenized_blocks_in_memory(cfg.data, tok)
    tokens = sets.numel()
seconds = time.perf_counter() - t0
print(json.dumps({"tokens": tokens, "seconds": seconds, "peak_above_mib": status("VmHWM") - before,
                  "peak_anon_above_mib": peak_anon[0] - anon_before}))
"""

# The former build, kept here only to be measured against: every document read into a list,
# every token id appended to one Python list, then one tensor.
IN_MEMORY = r"""
def tokenized_blocks_in_memory(dcfg, tokenizer):
    import torch
    from raclora_dist.data.batches import read_documents
    docs = read_documents(dcfg)
    ids = []
    for enc in tokenizer(docs, add_special_tokens=False)["input_ids"]:
        ids.extend(enc)
        ids.append(tokenizer.eos_token_id)
    n = len(ids) // dcfg.seq_len
    return torch.tensor(ids[: n * dcfg.seq_len], dtype=torch.long).view(n, dcfg.seq_len)
data.tokenized_blocks_in_memory = tokenized_blocks_in_memory
"""


def corpus(path: Path, mib: int, seed: int = 0) -> Path:
    """A JSONL corpus of about ``mib`` MiB: documents of 50-400 pseudo-random words."""
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(5000)]
    target, written = mib * 2**20, 0
    with path.open("w") as f:
        while written < target:
            line = json.dumps({"text": " ".join(rng.choices(words, k=rng.randint(50, 400)))}) + "\n"
            f.write(line)
            written += len(line)
    return path


def build(path: Path, mode: str, cap_mib: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="raclora-bench-cache-") as out:
        code = CHILD if mode == "streamed" else CHILD.replace("from raclora_dist.data import batches as data\n",
                                                               "from raclora_dist.data import batches as data\n" + IN_MEMORY)
        proc = subprocess.run([sys.executable, "-c", code, str(path), out, mode, str(cap_mib)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
        return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes-mib", type=int, nargs="+", default=[16, 64, 256])
    ap.add_argument("--inmemory-max-mib", type=int, default=64)
    ap.add_argument("--cap-mib", type=float, default=256.0, help="address-space cap of the streamed build")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="raclora-bench-corpus-") as tmp:
        for mib in args.sizes_mib:
            path = corpus(Path(tmp) / f"c{mib}.jsonl", mib)
            for mode in ("streamed", "in-memory"):
                if mode == "in-memory" and mib > args.inmemory_max_mib:
                    continue
                t0 = time.perf_counter()
                r = build(path, mode, args.cap_mib if mode == "streamed" else 0.0)
                rows.append({"corpus_mib": mib, "mode": mode, "cap_mib": args.cap_mib if mode == "streamed" else None,
                             "wall_s": time.perf_counter() - t0, **r})
                print(_line(rows[-1]), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rows": rows}, indent=1) + "\n")


def _line(r: dict) -> str:
    if "error" in r:
        return f"{r['corpus_mib']:>6} MiB  {r['mode']:<9}  failed: {r['error']}"
    per_m = r["seconds"] / (r["tokens"] / 1e6)
    cap = f"  (under a {r['cap_mib']:.0f} MiB cap)" if r.get("cap_mib") else ""
    return (f"{r['corpus_mib']:>6} MiB  {r['mode']:<9}  {r['tokens'] / 1e6:8.1f} M tokens  {per_m:6.3f} s/M tokens  "
            f"peak RSS +{r['peak_above_mib']:8.1f} MiB  private +{r['peak_anon_above_mib']:8.1f} MiB{cap}")


if __name__ == "__main__":
    main()
