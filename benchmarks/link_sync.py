"""Link-sync vs step-sync on the quickstart LM: eval loss after equal steps against the bytes
the workers exchanged, and wall time over an emulated slow network.

Usage: python -m benchmarks.link_sync --json OUT [--total-steps 320] [--ks 10,40,160]
       [--slow 10,100 --slow-steps 80 --slow-k 40]

Each case trains configs/quickstart.yaml with DDP on 2 workers through `raclora train` (no Ray),
``raclora.steps_per_link = K`` and ``links = total / K``, once with ``distributed.sync: step``
(gradients all-reduced every step) and once with ``sync: link`` (one all-reduce of the factors
per link). Bytes are rank 0's collective payload over the run (the ``comm_bytes_link`` of the
link records). ``--slow LATENCY_MS,MBIT`` reruns one K in both modes with every collective
slowed to such a network (:mod:`benchmarks.slow_link`: this kernel has no netem qdisc).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import write_json

ROOT = Path(__file__).resolve().parents[1]


def train(run: Path, k: int, links: int, sync: str, workers: int, slow: str | None = None,
          extra: tuple[str, ...] = ()) -> dict:
    cmd = [sys.executable, "-m", "raclora_dist", "train", "configs/quickstart.yaml", f"run.dir={run}",
           f"raclora.links={links}", f"raclora.steps_per_link={k}", f"distributed.workers={workers}",
           "distributed.strategy=ddp", f"distributed.sync={sync}", "ray.enabled=false", "train.warmup_steps=0", *extra]
    if slow:
        latency, mbit = (float(x) for x in slow.split(","))
        cmd.append(f"run.callbacks=[{{class: 'benchmarks.slow_link:SlowLink', args: {{latency_ms: {latency}, "
                   f"mbit: {mbit}}}}}]")
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"sync={sync} K={k} failed:\n{proc.stderr[-3000:]}")
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    links_ = [r for r in recs if r["type"] == "link"]
    return {"sync": sync, "K": k, "links": links, "steps": k * links, "final_eval_loss": links_[-1]["eval_loss"],
            "comm_bytes": sum(r["comm_bytes_link"] for r in links_),
            "train_s": sum(r["link_time_s"] for r in links_), "wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", required=True)
    ap.add_argument("--total-steps", type=int, default=320)
    ap.add_argument("--ks", default="10,40,160")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--set", nargs="*", default=[], help="config overrides for every case, e.g. train.lr=1e-2")
    ap.add_argument("--link-set", nargs="*", default=[],
                    help="overrides for the sync: link cases only, e.g. distributed.link_outer_lr=1.5")
    ap.add_argument("--slow", help="LATENCY_MS,MBIT of an emulated slow network for the wall-time cases, e.g. 10,100")
    ap.add_argument("--slow-steps", type=int, default=80)
    ap.add_argument("--slow-k", type=int, default=40)
    args = ap.parse_args()
    out: dict = {"config": "configs/quickstart.yaml", "overrides": args.set, "link_overrides": args.link_set,
                 "workers": args.workers,
                 "total_steps": args.total_steps,
                 "runs": [], "slow_network": None}
    with tempfile.TemporaryDirectory() as tmp:
        for k in (int(x) for x in args.ks.split(",")):
            for sync in ("step", "link"):
                extra = tuple(args.set) + (tuple(args.link_set) if sync == "link" else ())
                out["runs"].append(train(Path(tmp) / f"{sync}-{k}", k, args.total_steps // k, sync, args.workers,
                                         extra=extra))
        if args.slow:
            slow = [train(Path(tmp) / f"slow-{sync}", args.slow_k, args.slow_steps // args.slow_k, sync, args.workers,
                          args.slow, tuple(args.set) + (tuple(args.link_set) if sync == "link" else ()))
                    for sync in ("step", "link")]
            out["slow_network"] = {"latency_ms,mbit": args.slow, "K": args.slow_k, "runs": slow}
    print(f"{'K':>4} {'sync':5} {'eval loss':>9} {'vs step':>8} {'bytes':>12} {'fewer bytes':>11} {'train s':>8}")
    by = {(r["K"], r["sync"]): r for r in out["runs"]}
    for r in out["runs"]:
        ref = by[(r["K"], "step")]
        r["eval_vs_step"] = r["final_eval_loss"] / ref["final_eval_loss"] - 1
        r["bytes_ratio"] = ref["comm_bytes"] / max(r["comm_bytes"], 1)
        print(f"{r['K']:>4} {r['sync']:5} {r['final_eval_loss']:>9.4f} {100 * r['eval_vs_step']:>+7.2f}% "
              f"{r['comm_bytes']:>12,} {r['bytes_ratio']:>10.1f}x {r['train_s']:>8.1f}")
    if out["slow_network"]:
        print(f"\nover an emulated {args.slow} (latency ms, Mbit/s) network, K={args.slow_k}, {args.slow_steps} steps:")
        for r in out["slow_network"]["runs"]:
            print(f"  sync {r['sync']:5} train {r['train_s']:7.1f} s  ({r['train_s'] / r['steps']:.3f} s/step)  "
                  f"eval loss {r['final_eval_loss']:.4f}")
    write_json(args.json, out)


if __name__ == "__main__":
    main()
