"""How much of each link's update reaches the weights, per base dtype and merge mode.

Usage: python -m benchmarks.merge_fidelity --json OUT [--links 20] [--steps 5] [--cases "BASE:LABEL;..."]

For base dtypes fp32, bf16, nf4 and fp4 and every merge mode that applies, trains the
quickstart model (one process, `raclora train`, the same batches) for ``links`` links and
reports:

* the landed fraction ``<dW_eff, dW> / ||dW||^2`` after 1 link and cumulatively after all
  links (``dW`` the sum of the intended link updates, ``dW_eff`` the change of the effective
  weights, over all target layers), measured by replaying the recorded chain onto a fresh
  base (bitwise what training did) -- plus the per-link value training logged for link 1;
* the norm ratio ``||dW_eff|| / ||dW||`` and cosine after all links;
* the final eval loss;
* memory: the model state (parameters, buffers, master copies) and the peak RSS.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks import write_json

# (base dtype, label, merge mode, extra overrides)
CASES = [
    ("fp32", "into_base", "into_base", []),
    ("fp32", "factored", "factored", []),
    ("bf16", "into_base", "into_base", ["raclora.master_weights=none", "raclora.stochastic_rounding=false"]),
    ("bf16", "factored", "factored", []),
    # a typical fine-tuning learning rate: smaller links, closer to bf16's rounding step
    ("bf16", "into_base, lr 1e-4", "into_base",
     ["train.lr=1e-4", "raclora.master_weights=none", "raclora.stochastic_rounding=false"]),
    ("bf16", "factored, lr 1e-4", "factored", ["train.lr=1e-4"]),
    # the remedies for bf16 bases at that learning rate (core/master.py), and the exact chain
    ("bf16", "factored exact, lr 1e-4", "factored", ["train.lr=1e-4", "raclora.chain_budget=null"]),
    ("bf16", "into_base+master, lr 1e-4", "into_base",
     ["train.lr=1e-4", "raclora.master_weights=cpu", "raclora.stochastic_rounding=false"]),
    ("bf16", "into_base+stochastic, lr 1e-4", "into_base",
     ["train.lr=1e-4", "raclora.master_weights=none", "raclora.stochastic_rounding=true"]),
    ("bf16", "into_base+master+stochastic, lr 1e-4", "into_base",
     ["train.lr=1e-4", "raclora.master_weights=cpu", "raclora.stochastic_rounding=true"]),
    *[(q, label, mode, extra) for q in ("nf4", "fp4") for label, mode, extra in [
        ("factored", "factored", []),
        ("into_base", "into_base", ["raclora.allow_lossy_merge=true"]),
        ("into_base+stochastic", "into_base", ["raclora.stochastic_rounding=true"]),
        ("into_base+master", "into_base", ["raclora.master_weights=cpu"]),
    ]],
]


def dtype_args(dtype: str) -> list[str]:
    if dtype == "bf16":
        return ["model.dtype=bfloat16"]
    if dtype in ("nf4", "fp4"):
        return [f"model.quantization.method={dtype}"]
    return []


def state_mb(model: torch.nn.Module) -> float:
    """Parameters, buffers and CPU master copies held by the model, in MiB."""
    seen, total = set(), 0
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [m._cpu_master for m in model.modules() if getattr(m, "_cpu_master", None) is not None]
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total / 2**20


@torch.no_grad()
def cumulative_landed(run: Path, upto: int | None) -> dict:
    """Landed statistics of the first ``upto`` merged links (all if None), by replay."""
    from transformers.utils import logging as hf_logging

    from raclora_dist.checkpoint.folder import find_latest, load_checkpoint
    from raclora_dist.config import load_config
    from raclora_dist.core import ChainState, link_factors
    from raclora_dist.model.session import build_session

    hf_logging.disable_progress_bar()
    cfg = load_config(run / "config.yaml")
    state = load_checkpoint(find_latest(run)).chain
    keep = state.merged[:upto] if upto else state.merged
    partial = ChainState(merged=keep, factors={k: state.factors[k] for k in keep})
    s = build_session(cfg, source=run / "base")
    before = {n: layer.effective_weight() for n, layer in s.layers.items()}
    s.chain.replay(partial)
    inner = dd = ii = 0.0
    for name, layer in s.layers.items():
        d = (layer.effective_weight() - before[name]).double()
        i = sum(layer.scale * B.double() @ A.double() for B, A in link_factors(layer.spec, partial))
        inner, dd, ii = inner + float((d * i).sum()), dd + float((d * d).sum()), ii + float((i * i).sum())
    return {"fraction": inner / ii, "norm_ratio": (dd / ii) ** 0.5, "cosine": inner / (dd * ii) ** 0.5,
            "state_mb": state_mb(s.model)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", required=True)
    ap.add_argument("--config", default="configs/quickstart.yaml")
    ap.add_argument("--links", type=int, default=20)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--cases", default="", help="semicolon-separated BASE:LABEL names as printed "
                    "(e.g. 'bf16:into_base, lr 1e-4;bf16:into_base+master, lr 1e-4'); default all")
    args = ap.parse_args()
    wanted = {c.strip() for c in args.cases.split(";") if c.strip()}
    cases = [c for c in CASES if not wanted or f"{c[0]}:{c[1]}" in wanted]
    out = {"config": args.config, "links": args.links, "steps_per_link": args.steps, "runs": []}
    print(f"{'base':5} {'merge mode':36} {'link-1 landed':>13} {f'{args.links}-link landed':>14} {'ratio':>6} "
          f"{'cosine':>6} {'eval loss':>9} {'state MiB':>9} {'peak RSS MiB':>12}")
    with tempfile.TemporaryDirectory() as tmp:
        for i, (dtype, label, mode, extra) in enumerate(cases):
            run = Path(tmp) / f"{i:02d}-{dtype}"
            cmd = [sys.executable, "-m", "raclora_dist", "train", args.config, f"run.dir={run}",
                   f"raclora.links={args.links}", f"raclora.steps_per_link={args.steps}", "ray.enabled=false",
                   "distributed.strategy=single", "distributed.workers=1", "checkpoint.keep=1",
                   f"raclora.merge_mode={mode}", *dtype_args(dtype), *extra]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"{dtype} {label} failed:\n{proc.stderr[-3000:]}")
            recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            links = [r for r in recs if r["type"] == "link"]
            first, total = cumulative_landed(run, 1), cumulative_landed(run, None)
            m = {"base": dtype, "merge_mode": label, "landed_after_1": first["fraction"],
                 "landed_after_all": total["fraction"], "norm_ratio_after_all": total["norm_ratio"],
                 "cosine_after_all": total["cosine"], "logged_link1_landed": links[0]["landed_fraction"],
                 "final_eval_loss": links[-1]["eval_loss"], "state_mb": total["state_mb"],
                 "peak_rss_mb": max(r["rss_mb"] for r in recs if r["type"] == "step")}
            out["runs"].append(m)
            print(f"{dtype:5} {label:36} {m['landed_after_1']:>13.3f} {m['landed_after_all']:>14.3f} "
                  f"{m['norm_ratio_after_all']:>6.2f} {m['cosine_after_all']:>6.3f} {m['final_eval_loss']:>9.4f} "
                  f"{m['state_mb']:>9.2f} {m['peak_rss_mb']:>12.0f}", flush=True)
    write_json(args.json, out)


if __name__ == "__main__":
    main()
