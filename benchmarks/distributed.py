"""Per-engine speed at the quickstart size: tokens/s with 1 and 2 workers, merge-step share.

Usage: python -m benchmarks.distributed --json OUT [--links 2] [--steps 40]

Each engine trains configs/quickstart.yaml (same global batch of 16 x 128 tokens) through
`raclora train`, so launch and engine overheads are the product's own. Tokens/s is the
median over steps, leaving out each link's first step (it follows the boundary); the merge
share is the boundary's merge time over the link's training time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks import write_json

CASES = [
    ("single", 1, ["distributed.strategy=single"]),
    ("ddp", 2, ["distributed.strategy=ddp"]),
    ("fsdp2", 1, ["distributed.strategy=fsdp2"]),
    ("fsdp2", 2, ["distributed.strategy=fsdp2"]),
    ("zero2", 2, ["distributed.strategy=deepspeed", "distributed.deepspeed={zero_optimization: {stage: 2}}"]),
    ("zero3", 2, ["distributed.strategy=deepspeed", "distributed.deepspeed={zero_optimization: {stage: 3}}"]),
]


def measure(run: Path, links: int) -> dict:
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if r["type"] == "step"]
    link_recs = [r for r in recs if r["type"] == "link"]
    firsts = {min(s["step"] for s in steps if s["link"] == t) for t in range(links)}
    tps = [s["tokens_per_s"] for s in steps if s["step"] not in firsts]
    merge = sum(r["merge_time_s"] for r in link_recs)
    train = sum(r["link_time_s"] for r in link_recs)
    return {"tokens_per_s": statistics.median(tps), "merge_share": merge / (merge + train),
            "merge_ms_per_link": 1e3 * merge / len(link_recs), "final_eval_loss": link_recs[-1]["eval_loss"],
            "peak_rss_mb_rank0": max(s["rss_mb"] for s in steps)}


def train_quickstart(run: Path, links: int, steps: int, workers: int, extra: list[str]) -> dict:
    """Trains configs/quickstart.yaml without Ray through `raclora train`; returns :func:`measure`."""
    cmd = [sys.executable, "-m", "raclora_dist", "train", "configs/quickstart.yaml", f"run.dir={run}",
           f"raclora.links={links}", f"raclora.steps_per_link={steps}", f"distributed.workers={workers}",
           "ray.enabled=false", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(extra)} x{workers} failed:\n{proc.stderr[-3000:]}")
    return measure(run, links)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", required=True)
    ap.add_argument("--links", type=int, default=2)
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args()
    rows, out = [], {"config": "configs/quickstart.yaml", "links": args.links, "steps_per_link": args.steps, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        for name, workers, extra in CASES:
            run = Path(tmp) / f"{name}-{workers}"
            m = {"engine": name, "workers": workers, **train_quickstart(run, args.links, args.steps, workers, extra)}
            out["runs"].append(m)
            rows.append(m)
    base = rows[0]["tokens_per_s"]
    print(f"{'engine':8} {'workers':>7} {'tokens/s':>9} {'vs single':>9} {'merge ms/link':>13} {'merge share':>11} "
          f"{'eval loss':>9}")
    for m in rows:
        print(f"{m['engine']:8} {m['workers']:>7} {m['tokens_per_s']:>9.0f} {m['tokens_per_s'] / base:>9.2f} "
              f"{m['merge_ms_per_link']:>13.1f} {100 * m['merge_share']:>10.2f}% {m['final_eval_loss']:>9.4f}")
    write_json(args.json, out)


if __name__ == "__main__":
    main()
