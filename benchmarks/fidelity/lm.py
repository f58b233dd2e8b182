"""The causal-LM comparison on the product's own path: the quickstart model and data.

RAC-LoRA is trained by the product's trainer (``raclora train``'s ``run_training``); PEFT
LoRA (same rank and targets) and full fine-tuning run the same number of optimizer steps on
the same batches (``PackedData``) from the same base, and all are scored on the same eval
batches.
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path

import torch

from raclora_dist.config import load_config, with_values
from raclora_dist.model.session import build_session
from raclora_dist.train.run import load_data, run_training

CONFIG = "configs/quickstart.yaml"


def _eval(model, data, batches: int) -> float:
    model.eval()
    with torch.no_grad():
        losses = [model(input_ids=b, labels=b).loss.item() for b in data.eval_batches(batches)]
    model.train()
    return sum(losses) / len(losses)


def _train_plain(model, params, data, steps: int, lr: float, warmup: int) -> list[float]:
    """AdamW with one warm-up + cosine over the whole run; returns per-step losses."""
    opt = torch.optim.AdamW(params, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / max(1, warmup))
                                              * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * i / steps))))
    losses = []
    for i in range(steps):
        batch = data.train_batch(i)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def experiment(overrides: list[str] | None = None, ft_lr: float = 1e-3) -> dict:
    # one process, like the PEFT and full fine-tuning loops it is compared with
    single = ["ray.enabled=false", "distributed.strategy=single", "distributed.workers=1"]
    cfg = load_config(CONFIG, single + (overrides or []))
    steps = cfg.raclora.links * cfg.raclora.steps_per_link
    data = load_data(cfg)
    out: dict = {"config": CONFIG, "overrides": overrides or [], "steps": steps, "methods": {}}
    with tempfile.TemporaryDirectory() as tmp:
        cfg = with_values(cfg, {"run.dir": str(Path(tmp) / "rac")})
        t0 = time.perf_counter()
        history = run_training(cfg)
        base = build_session(cfg, source=Path(cfg.run.dir) / "base")  # the untouched base
        start = _eval(base.model, data, cfg.train.eval_batches)
        out["start_eval_loss"] = start
        out["methods"]["rac_lora"] = {"eval_loss": history[-1]["eval_loss"], "seconds": time.perf_counter() - t0,
                                      "trainable_per_link": base.chain.num_trainable()}
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        for method in ("peft_lora", "full_ft"):
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_pretrained(Path(cfg.run.dir) / "base")
            lr = cfg.train.lr
            if method == "peft_lora":
                model = get_peft_model(model, LoraConfig(r=cfg.raclora.rank, lora_alpha=cfg.raclora.alpha,
                                                         target_modules=list(cfg.raclora.target_modules)))
            else:
                lr = ft_lr
            params = [p for p in model.parameters() if p.requires_grad]
            t0 = time.perf_counter()
            _train_plain(model, params, data, steps, lr, cfg.train.warmup_steps)
            out["methods"][method] = {"eval_loss": _eval(model, data, cfg.train.eval_batches),
                                      "seconds": time.perf_counter() - t0, "lr": lr,
                                      "trainable": sum(p.numel() for p in params)}
    return out


def plot(result: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["methods"])
    vals = [result["methods"][n]["eval_loss"] for n in names]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar(names, vals, color=["C0", "C1", "grey"])
    ax.axhline(result["start_eval_loss"], color="k", ls="--", lw=1, label="base (before training)")
    ax.set_ylabel("eval loss")
    ax.set_title(f"quickstart, {result['steps']} steps each")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
