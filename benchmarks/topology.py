"""Scale-out topologies on a Ray cluster of 2 nodes x 2 workers: bytes inside and across nodes,
eval loss after the same steps, and steps/s with the link between nodes slowed.

Usage: python -m benchmarks.topology --json OUT [--size 0.79b] [--total-steps 80]
       [--slow 10,100] [--parts bytes,loss,slow]

The cluster is ``ray.cluster_utils.Cluster`` on this machine: a head with no CPUs (the
driver's) and two worker nodes of 2 CPUs, each its own raylet; Ray Train packs 2 workers on
each (contiguous ranks per node, ``LOCAL_WORLD_SIZE`` 2), so "across" is between the raylets.
Every case is ``raclora train`` with ``ray.address`` set, 4 workers, FSDP2:

* ``full-shard``: sharded over all 4 workers (every gather and reduction spans both nodes);
* ``hsdp``: ``distributed.replicas: 2`` (sharded inside a node, gradients all-reduced across);
* ``link-fsdp2``: ``distributed.sync: link``, ``sync_groups: 2`` (a node trains its own link
  sharded over its 2 workers; one all-reduce of the factor shards across nodes per link),
  ``link_outer_lr`` 1.5 (docs/link-sync.md).

Parts:

1. ``bytes``: a from-config Llama of ``--size`` (streamed into a sharded fp32 folder, loaded
   through ``model.name_or_path``), 1 link of 2 steps: rank 0's payload per step inside and
   across nodes (the ``comm_bytes`` / ``comm_bytes_across`` of its step records) and per
   boundary. Link-sync's per-step figure at K is its step bytes plus the boundary's / K.
2. ``loss``: configs/quickstart.yaml's model and data, ``--total-steps`` steps: step-sync
   cases at K = 40, link-sync at K = 10 and 40; eval loss at the end, bytes over the run.
3. ``slow``: the quickstart cases again for 40 steps (K = 40) with the collectives that cross
   nodes slowed to ``--slow LATENCY_MS,MBIT`` (:mod:`benchmarks.slow_link`, ``across_only``;
   the link inside a node stays fast): steps per second of training time.
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

import yaml

from benchmarks import write_json

ROOT = Path(__file__).resolve().parents[1]
CASES = {
    "full-shard": ["distributed.strategy=fsdp2"],
    "hsdp": ["distributed.strategy=fsdp2", "distributed.replicas=2"],
    "link-fsdp2": ["distributed.strategy=fsdp2", "distributed.sync=link", "distributed.sync_groups=2",
                   "distributed.link_outer_lr=1.5"],
}


def start_cluster():
    """Head (0 CPUs) + 2 nodes of 2 CPUs, each a raylet; the workers inherit this environment."""
    from ray.cluster_utils import Cluster

    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    os.environ["OMP_NUM_THREADS"] = "1"
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0}, connect=False)
    for _ in range(2):
        c.add_node(num_cpus=2)
    c.wait_for_nodes()
    return c


def train(address: str, cfg: Path, run: Path, extra: list[str]) -> list[dict]:
    cmd = [sys.executable, "-m", "raclora_dist", "train", str(cfg), f"run.dir={run}", "ray.enabled=true",
           f"ray.address={address}", f"ray.storage_path={run.parent / 'ray'}", "distributed.workers=4", *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(extra)} failed:\n{proc.stderr[-4000:]}\n{proc.stdout[-2000:]}")
    print(f"  {run.name}: {time.perf_counter() - t0:.0f} s", flush=True)
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _kind(records: list[dict], kind: str) -> list[dict]:
    return [r for r in records if r["type"] == kind]


def bytes_part(address: str, size: str, work: Path, seq: int, batch: int) -> dict:
    from benchmarks.scale import run_config, write_checkpoint

    folder = work / f"model-{size}"
    info = write_checkpoint(size, folder, seq)
    print(f"wrote {size}: {info['params'] / 1e9:.2f} B parameters, {info['bytes'] / 2**30:.2f} GiB", flush=True)
    out = {"size": size, "params": info["params"], "checkpoint_bytes": info["bytes"], "cases": {}}
    for name, extra in CASES.items():
        cfg = run_config(folder, work / name, 4, seq, batch)
        cfg["raclora"].update({"links": 1, "steps_per_link": 2})
        cfg["checkpoint"] = {"every_links": 1, "keep": 1}
        path = work / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        recs = train(address, path, work / name, extra)
        steps, link = _kind(recs, "step"), _kind(recs, "link")[0]
        out["cases"][name] = {
            "step_bytes": max(r["comm_bytes"] for r in steps), "step_bytes_across": max(r["comm_bytes_across"] for r in steps),
            "boundary_bytes": link["comm_bytes_boundary"], "boundary_bytes_across": link["comm_bytes_boundary_across"],
            "link_bytes_across": link["comm_bytes_link_across"], "tokens_per_s": [r["tokens_per_s"] for r in steps],
        }
    full = out["cases"]["full-shard"]["step_bytes_across"]
    link = out["cases"]["link-fsdp2"]
    for k in (10, 40):
        # per step at K: the steps' own (0 across) plus the link's boundary and fingerprint share
        out["cases"][f"link-fsdp2 K={k}"] = {"step_bytes_across": link["step_bytes_across"]
                                             + (link["link_bytes_across"] - 2 * link["step_bytes_across"]) / k}
    for row in out["cases"].values():
        row["across_vs_full_shard"] = row["step_bytes_across"] / full
    return out


def quickstart_case(address: str, work: Path, name: str, k: int, steps: int, slow: str | None) -> dict:
    extra = [*CASES[name], f"raclora.steps_per_link={k}", f"raclora.links={steps // k}", "train.warmup_steps=0",
             "checkpoint.every_links=1000"]
    if slow:
        latency, mbit = (float(x) for x in slow.split(","))
        extra.append(f"run.callbacks=[{{class: 'benchmarks.slow_link:SlowLink', args: {{latency_ms: {latency}, "
                     f"mbit: {mbit}, across_only: true}}}}]")
    tag = f"{name}-K{k}{'-slow' if slow else ''}"
    recs = train(address, ROOT / "configs" / "quickstart.yaml", work / tag, extra)
    links = _kind(recs, "link")
    train_s = sum(r["link_time_s"] for r in links)
    return {"case": name, "K": k, "steps": steps, "final_eval_loss": links[-1]["eval_loss"],
            "bytes": sum(r["comm_bytes_link"] for r in links), "bytes_across": sum(r["comm_bytes_link_across"] for r in links),
            "train_s": train_s, "steps_per_s": steps / train_s}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", required=True)
    ap.add_argument("--size", default="0.79b")
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--total-steps", type=int, default=80)
    ap.add_argument("--slow", default="10,100", help="LATENCY_MS,MBIT of the link between nodes")
    ap.add_argument("--parts", default="bytes,loss,slow")
    args = ap.parse_args(argv)
    parts = args.parts.split(",")
    out: dict = {"cluster": "2 nodes x 2 workers (ray.cluster_utils.Cluster, one raylet per node), FSDP2, gloo",
                 "slow": args.slow}
    cluster = start_cluster()
    try:
        with tempfile.TemporaryDirectory(prefix="topology-") as tmp:
            work = Path(tmp)
            if "bytes" in parts:
                out["bytes"] = bytes_part(cluster.address, args.size, work, args.seq, args.batch)
            cases = [("full-shard", 40), ("hsdp", 40), ("link-fsdp2", 10), ("link-fsdp2", 40)]
            if "loss" in parts:
                out["loss"] = [quickstart_case(cluster.address, work, n, k, args.total_steps, None) for n, k in cases]
            if "slow" in parts:
                out["slow_runs"] = [quickstart_case(cluster.address, work, n, k, 40, args.slow) for n, k in cases
                                    if k == 40]
    finally:
        cluster.shutdown()
    print_tables(out)
    write_json(args.json, out)


def print_tables(out: dict) -> None:
    if "bytes" in out:
        b = out["bytes"]
        print(f"\nbytes per step, rank 0, {b['size']} ({b['params'] / 1e9:.2f} B parameters)")
        print(f"{'case':<18} {'inside+across':>14} {'across':>12} {'vs full shard':>14}")
        for name, row in b["cases"].items():
            print(f"{name:<18} {row.get('step_bytes', float('nan')):>14,.0f} {row['step_bytes_across']:>12,.0f} "
                  f"{row['across_vs_full_shard']:>14.4f}")
    if "loss" in out:
        print("\nquickstart, eval loss after the same steps")
        print(f"{'case':<12} {'K':>3} {'eval loss':>10} {'bytes across':>14} {'steps/s':>8}")
        for r in out["loss"]:
            print(f"{r['case']:<12} {r['K']:>3} {r['final_eval_loss']:>10.4f} {r['bytes_across']:>14,.0f} "
                  f"{r['steps_per_s']:>8.2f}")
    if "slow_runs" in out:
        print(f"\nacross-node link slowed to {out['slow']} (ms, Mbit/s), 40 steps")
        for r in out["slow_runs"]:
            print(f"{r['case']:<12} K={r['K']:<3} {r['steps_per_s']:.2f} steps/s")


if __name__ == "__main__":
    main()
