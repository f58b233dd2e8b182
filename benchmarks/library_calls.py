"""Two library calls where speed is the point: ``datasets.map``'s ``num_proc`` for rendering and
tokenizing chat rows, and ``model.generate``'s KV cache for the sample answers.

- **Tokenizing**: the bundled chat set (``configs/chat.yaml``'s ``data/stdlib_chat.jsonl``,
  4,000 conversations) through :func:`raclora_dist.data.batches.write_blocks` with
  ``data.num_proc`` 1 and N, with the config's byte tokenizer and, with ``--pretrained``, with
  SmolLM2-135M-Instruct's own tokenizer and chat template (``benchmarks/pretrained.py``).
  Each is built ``--repeats`` times into a fresh folder; the first is a warm-up, the table
  shows the median of the rest. The blocks' SHA-256 must be the same for every ``num_proc``.
- **Sampling**: ``configs/chat.yaml``'s sample prompts answered by
  :meth:`raclora_dist.train.samples.Sampler.answers` with and without the KV cache
  (``train.sample_tokens`` tokens, greedy), on ``configs/chat.yaml``'s model built from its
  config and, with ``--pretrained``, on SmolLM2-135M-Instruct. The answers must be the same.

Usage::

    python -m benchmarks.library_calls --pretrained --json benchmarks/results/library_calls.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch


def _blocks_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.iterdir()):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()[:16]


def tokenize_times(cfg, tokenizer, procs: list[int], repeats: int) -> list[dict]:
    from raclora_dist.config import with_values
    from raclora_dist.data.batches import write_blocks

    rows = []
    for n in procs:
        c = with_values(cfg, {"data.num_proc": n})
        secs, digests = [], set()
        for _ in range(repeats):
            with tempfile.TemporaryDirectory() as d:
                t = time.perf_counter()
                write_blocks(c.data, tokenizer, Path(d))
                secs.append(time.perf_counter() - t)
                digests.add(_blocks_digest(Path(d)))
        rows.append({"num_proc": n, "seconds": statistics.median(secs[1:] or secs), "all_seconds": secs,
                     "blocks_sha256": sorted(digests)})
    return rows


def sample_times(sampler, model, repeats: int) -> list[dict]:
    rows = []
    for cache in (True, False):
        secs, answers = [], None
        for _ in range(repeats):
            t = time.perf_counter()
            answers = sampler.answers(model, torch.device("cpu"), cache=cache)
            secs.append(time.perf_counter() - t)
        rows.append({"kv_cache": cache, "seconds": statistics.median(secs[1:] or secs), "all_seconds": secs,
                     "answers": answers})
    return rows


def _model_cases(cfg, pretrained: bool):
    from transformers import AutoModelForCausalLM

    from raclora_dist.config import with_values
    from raclora_dist.data.tokenizer import load_tokenizer, tokenizer_source
    from raclora_dist.model.build import hf_config

    torch.manual_seed(cfg.model.init_seed)
    built = AutoModelForCausalLM.from_config(hf_config(cfg.model))  # random weights: a timing, not answers
    yield "chat.yaml (config-built, byte tokenizer)", cfg, load_tokenizer(tokenizer_source(cfg)), built
    if pretrained:
        from benchmarks.pretrained import smollm2_folder

        folder = smollm2_folder()
        c = with_values(cfg, {"model.name_or_path": str(folder), "model.config": None, "data.tokenizer": None,
                              "data.chat_template": None, "data.seq_len": 512})
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
        yield "SmolLM2-135M-Instruct (its tokenizer and template)", c, load_tokenizer(str(folder)), model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/chat.yaml")
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--pretrained", action="store_true", help="also SmolLM2-135M-Instruct (benchmarks/pretrained.py)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    from raclora_dist.config import load_config
    from raclora_dist.train.samples import Sampler

    cfg = load_config(args.config)
    torch.set_num_threads(torch.get_num_threads())
    results = []
    for name, c, tok, model in _model_cases(cfg, args.pretrained):
        model.eval()
        tokenize = tokenize_times(c, tok, args.procs, args.repeats)
        sampler = Sampler(c.train.sample_prompts, tok, c.data, chat=True, tokens=c.train.sample_tokens)
        sample = sample_times(sampler, model, args.repeats)
        results.append({"case": name, "tokenize": tokenize, "sample": sample})
        print(f"\n{name}")
        print("| tokenizing the chat set | seconds | blocks |")
        print("|---|---|---|")
        for r in tokenize:
            print(f"| num_proc {r['num_proc']} | {r['seconds']:.2f} | {', '.join(r['blocks_sha256'])} |")
        print(f"| sample answers ({len(sampler.prompts)} prompts, {c.train.sample_tokens} tokens) | seconds | "
              "same answers |")
        print("|---|---|---|")
        for r in sample:
            same = r["answers"] == sample[0]["answers"]
            print(f"| {'with' if r['kv_cache'] else 'without'} the KV cache | {r['seconds']:.2f} | {same} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"config": args.config, "threads": torch.get_num_threads(),
                                         "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
