"""RAC-LoRA against PEFT LoRA and full fine-tuning: speed and memory, side by side, one process.

Usage: python -m benchmarks.throughput --json OUT [--device cpu|cuda] [--sizes small,medium,large]
       [--rounds 6] [--window 4] [--workers] [--quant nf4] [--dtype bfloat16] [--seq N] [--batch N]
       [--activation-checkpointing]

On a GPU (docs/benchmarks.md has the command): ``--device cuda --dtype bfloat16 --quant nf4
--sizes 8b --methods peft_lora,rac_right`` is QLoRA on a Llama-3-8B-shaped model, each
method's model built on the GPU in bf16 and quantized there.

For each model size (Llama-style, built from a config with the same seed), every method
trains the same model on the same batches (bundled corpus, byte tokenizer), with AdamW at
the same learning rate, rank and targets:

* ``full``: full fine-tuning;
* ``peft_lora``: PEFT LoRA (``get_peft_model``, dropout 0);
* ``rac_right`` / ``rac_left``: RAC-LoRA with a right / left sketch on every target;
* ``rac_shared``: right sketches with ``sketch_groups`` [[q,k,v], [gate,up]];
* on request, ``rac_right_fp32chain``: ``rac_right`` with its chain held in fp32 (the default,
  ``raclora.chain_dtype: auto``, holds a bf16 or 4-bit base's chain in bf16).

Tokens/s is the median over ``rounds`` timed windows of ``window`` steps each, after a
warm-up; the methods take turns window by window (so drifts of the machine hit all alike).
Memory is counted, not sampled: the bytes autograd saves for backward (activations, deduped
by storage, parameters and buffers excluded), gradients and optimizer state -- together the
training memory above the weights -- plus, per method in a fresh child process, the peak RSS
above the RSS after building the model (on CUDA: peak allocated above the weights). The
merge share is one boundary (guard, merge, resample, optimizer reset) over a link of 100
steps at the measured step time. ``--workers`` adds RAC-LoRA under FSDP2 with 1 and 2
workers through ``raclora train``. ``--quant nf4`` holds every method's base in 4 bits
(QLoRA: PEFT LoRA vs RAC-LoRA over the same NF4 weights; full fine-tuning left out).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import proc_status_kb, write_json

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "data" / "stdlib_docstrings.jsonl"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GROUPS = [["q_proj", "k_proj", "v_proj"], ["gate_proj", "up_proj"]]
METHODS = ["full", "peft_lora", "rac_right", "rac_left", "rac_shared"]

_BASE = {"model_type": "llama", "vocab_size": 320, "max_position_embeddings": 512, "tie_word_embeddings": False,
         "initializer_range": 0.1}
SIZES = {
    # name: (model config, sequence length, batch)
    "tiny": ({**_BASE, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2}, 32, 4),
    "small": ({**_BASE, "hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 4, "num_attention_heads": 4,
               "num_key_value_heads": 2}, 128, 16),
    "medium": ({**_BASE, "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4, "num_attention_heads": 8,
                "num_key_value_heads": 4}, 128, 16),
    "large": ({**_BASE, "hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 4, "num_attention_heads": 8,
               "num_key_value_heads": 4}, 128, 8),
    # Llama-3-8B's shapes (GQA 32/8 heads, 128k vocabulary, untied head): for GPUs
    "8b": ({**_BASE, "vocab_size": 128256, "max_position_embeddings": 8192, "initializer_range": 0.02,
            "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 8, "rope_theta": 500000.0}, 2048, 1),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def batches(seq_len: int, batch: int, count: int) -> list[torch.Tensor]:
    """The same ``count`` (batch, seq_len) token batches for every method."""
    from raclora_dist.config import DataSection
    from raclora_dist.data.batches import PackedData, pack, read_documents
    from raclora_dist.data.tokenizer import load_tokenizer

    data = DataSection(path=str(CORPUS), seq_len=seq_len, max_documents=4000)
    blocks = pack(read_documents(data), load_tokenizer("bytes"), seq_len)
    packed = PackedData(blocks, 0.0, batch, seed=0)
    return [packed.train_batch(i) for i in range(count)]


def build(method: str, size: str, rank: int, alpha: float, device: str, quant: str = "none",
          dtype: str = "float32", checkpointing: bool = False, prefill: int = 0, budget: float | None = 0.1):
    """A fresh model for ``method`` (its linear layers in 4 bits with ``quant``); returns
    (model, trainable params, chain or None).

    ``prefill`` > 0 (RAC-LoRA on a bf16 or 4-bit base, whose merges are factored): the chain is
    set to what it holds at link ``prefill`` (random factors at that rank: ``prefill x r``
    columns, at most the cap ``budget`` gives, ``raclora.chain_budget``, and the default
    ``raclora.chain_links``), so that a step is
    timed with the chain of a long run without training the links first.

    On a GPU the model is built there (in ``dtype``) and quantized there; on a CPU it is built
    in fp32 and cast. The weights are the same for every method (seed 0 on that device)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from raclora_dist.model.session import enable_activation_checkpointing

    cfg = dict(SIZES[size][0])
    torch.manual_seed(0)
    hf_cfg = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    if device == "cuda":
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(hf_cfg, dtype=DTYPES[dtype])
    else:
        model = AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32).to(DTYPES[dtype])
    if quant != "none":  # QLoRA: the same 4-bit base under PEFT and RAC-LoRA (uint8 storage)
        from raclora_dist.quant import QuantizationConfig
        from raclora_dist.quant.bnb import quantize_model

        quantize_model(model, QuantizationConfig(method=quant, compute_dtype=dtype), "uint8")  # no CPU repacking
    for p in model.parameters():
        p.requires_grad_(False)  # the base is frozen under every adapter (full unfreezes it below)
    if checkpointing:
        enable_activation_checkpointing(model)
    chain = None
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    elif method == "peft_lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, target_modules=TARGETS, lora_dropout=0.0))
    elif method.startswith("rac_"):
        from raclora_dist.core import RacLoraChain, RacLoraConfig, inject

        side = "left" if method == "rac_left" else "right"
        rc = RacLoraConfig(rank=rank, alpha=alpha, target_modules=TARGETS, sketch_side=side,
                           sketch_groups=GROUPS if method == "rac_shared" else [], links=max(4, prefill + 1),
                           chain_budget=budget, chain_dtype="float32" if method.endswith("_fp32chain") else "auto")
        chain = RacLoraChain(inject(model, rc))
    model.to(device).train()
    if chain is not None:
        chain.start_link(prefill)
        _prefill_chain(chain, prefill)
    params = [p for p in model.parameters() if p.requires_grad]
    return model, params, chain


@torch.no_grad()
def _prefill_chain(chain, links: int) -> None:
    """Fills each factored layer's chain with ``links x r`` random columns (at most its cap)."""
    for layer in chain.layers.values():
        R = min(links * layer.rank, layer.chain_A.shape[0])
        if R:
            layer.chain_B[:, :R].normal_(std=1e-3)
            layer.chain_A[:R].normal_()
            layer.chain_rank = R


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class Runner:
    """One method's model, optimizer and position in the shared batch sequence."""

    def __init__(self, method: str, size: str, args, data: list[torch.Tensor]) -> None:
        self.method, self.device, self.data = method, args.device, data
        self.model, self.params, self.chain = build(method, size, args.rank, args.alpha, args.device, args.quant,
                                                    args.dtype, args.activation_checkpointing, args.prefill_links,
                                                    args.chain_budget)
        self.opt = torch.optim.AdamW(self.params, lr=args.lr)
        self.i = 0
        self.tokens_per_step = data[0].numel()
        with torch.no_grad():
            self.initial_loss = self.loss(data[0]).item()

    def loss(self, batch: torch.Tensor) -> torch.Tensor:
        ids = batch.to(self.device)
        return self.model(input_ids=ids, labels=ids).loss

    def step(self) -> float:
        loss = self.loss(self.data[self.i])
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.i += 1
        return loss.item()

    def window(self, steps: int) -> float:
        """Tokens/s over ``steps`` steps."""
        _sync(self.device)
        t0 = time.perf_counter()
        for _ in range(steps):
            self.last_loss = self.step()
        _sync(self.device)
        return steps * self.tokens_per_step / (time.perf_counter() - t0)

    def memory(self) -> dict:
        """Bytes of one step: saved activations, gradients, optimizer state, weights."""
        own = {t.untyped_storage().data_ptr() for t in [*self.model.parameters(), *self.model.buffers()]}
        saved: dict[int, int] = {}

        def pack(t: torch.Tensor):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in own:
                saved[ptr] = t.untyped_storage().nbytes()
            return t

        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = self.loss(self.data[self.i])
        loss.backward()
        grads = sum(p.grad.nbytes for p in self.params if p.grad is not None)
        self.opt.step()
        state = sum(v.nbytes for s in self.opt.state.values() for v in s.values() if torch.is_tensor(v))
        self.opt.zero_grad(set_to_none=True)
        self.i += 1
        out = {"activation_bytes": sum(saved.values()), "grad_bytes": grads, "optimizer_bytes": state,
               "weight_bytes": sum(t.nbytes for t in [*self.model.parameters(), *self.model.buffers()]),
               "trainable_params": sum(p.numel() for p in self.params)}
        out["train_bytes_above_weights"] = out["activation_bytes"] + out["grad_bytes"] + out["optimizer_bytes"]
        if self.device == "cuda":
            out["cuda_peak_above_start_bytes"] = torch.cuda.max_memory_allocated() - base
            # what this method alone would need: its weights, and its step's peak above them
            out["cuda_peak_own_bytes"] = out["weight_bytes"] + out["cuda_peak_above_start_bytes"]
        return out

    def boundary_ms(self, repeats: int = 5) -> float | None:
        """Median time of a link boundary (guard, merge, resample, optimizer reset)."""
        if self.chain is None:
            return None
        times = []
        for _ in range(repeats):
            _sync(self.device)
            t0 = time.perf_counter()
            self.chain.end_link()
            self.opt.state.clear()
            self.chain.start_link(self.chain.link + 1)
            _sync(self.device)
            times.append(1e3 * (time.perf_counter() - t0))
        return statistics.median(times)


def child_peak_rss(method: str, size: str, args) -> float | None:
    """Peak RSS (MiB) of a few training steps above the RSS after building, in a fresh process."""
    if args.device != "cpu" or not Path("/proc/self/clear_refs").exists():
        return None
    cmd = [sys.executable, "-m", "benchmarks.throughput", "--child", method, "--sizes", size, "--json", "-",
           "--rank", str(args.rank), "--lr", str(args.lr), "--quant", args.quant, "--dtype", args.dtype]
    cmd += [f"--seq={args.seq}", f"--batch={args.batch}"] if args.seq else []
    cmd += ["--activation-checkpointing"] if args.activation_checkpointing else []
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"memory child for {method}/{size} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_above_build_mb"]


def shape(size: str, args) -> tuple[int, int]:
    """(sequence length, batch) of ``size``, unless the command line sets them."""
    _, seq, batch = SIZES[size]
    return args.seq or seq, args.batch or batch


def run_child(args) -> None:
    size = args.sizes[0]
    seq, batch = shape(size, args)
    runner = Runner(args.child, size, args, batches(seq, batch, 4))
    gc.collect()
    before = proc_status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets the peak (VmHWM) to the current RSS
    for _ in range(3):
        runner.step()
    print(json.dumps({"peak_above_build_mb": (proc_status_kb("VmHWM") - before) / 1024}))


def bench_size(size: str, args) -> dict:
    seq, batch = shape(size, args)
    steps = args.warmup + args.rounds * args.window + 1
    data = batches(seq, batch, steps + 1)
    runners = {m: Runner(m, size, args, data) for m in args.methods}
    for r in runners.values():  # warm-up (allocator, thread pools, first-call paths)
        r.window(args.warmup)
    tps: dict[str, list[float]] = {m: [] for m in runners}
    for k in range(args.rounds):
        order = list(runners)[k % len(runners):] + list(runners)[: k % len(runners)]
        for m in order:
            tps[m].append(runners[m].window(args.window))
    out = {}
    for m, r in runners.items():
        mem = r.memory()  # one more step, same index for every method
        row = {"tokens_per_s": statistics.median(tps[m]), "tokens_per_s_windows": tps[m],
               "initial_loss": r.initial_loss, "loss_at_equal_steps": r.last_loss, "steps": r.i, **mem}
        ms = r.boundary_ms()
        if ms is not None:
            step_ms = 1e3 * r.tokens_per_step / row["tokens_per_s"]
            row["boundary_ms"] = ms
            row["merge_share_at_100_steps"] = ms / (ms + 100 * step_ms)
        row["peak_rss_above_build_mb"] = child_peak_rss(m, size, args) if args.rss else None
        out[m] = row
        del r
    ref = out.get("peft_lora")
    for row in out.values():
        if ref:
            row["tokens_per_s_vs_peft"] = row["tokens_per_s"] / ref["tokens_per_s"]
            row["train_memory_vs_peft"] = row["train_bytes_above_weights"] / ref["train_bytes_above_weights"]
    return {"seq_len": seq, "batch": batch, "model": SIZES[size][0], "methods": out}


def scaling(args) -> dict:
    """RAC-LoRA (quickstart config) through `raclora train` under FSDP2 with 1 and 2 workers."""
    from benchmarks.distributed import train_quickstart

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for workers in (1, 2):
            out[f"fsdp2_x{workers}"] = train_quickstart(Path(tmp) / f"fsdp2-{workers}", 2, 20, workers,
                                                        ["distributed.strategy=fsdp2"])
    out["scaling_2_vs_1"] = out["fsdp2_x2"]["tokens_per_s"] / out["fsdp2_x1"]["tokens_per_s"]
    return out


def print_table(size: str, res: dict) -> None:
    print(f"\n{size}: seq {res['seq_len']} x batch {res['batch']}, hidden {res['model']['hidden_size']}")
    print(f"{'method':11} {'tokens/s':>9} {'vs PEFT':>7} {'trainable':>10} {'optim MiB':>9} {'activ MiB':>9} "
          f"{'train MiB':>9} {'vs PEFT':>7} {'RSS+ MiB':>8} {'GPU MiB':>8} {'merge@100':>9} {'loss0':>7} {'loss_end':>8}")
    for m, r in res["methods"].items():
        rss = r["peak_rss_above_build_mb"]
        gpu = r.get("cuda_peak_own_bytes")
        merge = r.get("merge_share_at_100_steps")
        print(f"{m:11} {r['tokens_per_s']:>9.0f} {r.get('tokens_per_s_vs_peft', float('nan')):>7.2f} "
              f"{r['trainable_params']:>10,} {r['optimizer_bytes'] / 2**20:>9.2f} {r['activation_bytes'] / 2**20:>9.1f} "
              f"{r['train_bytes_above_weights'] / 2**20:>9.1f} {r.get('train_memory_vs_peft', float('nan')):>7.2f} "
              f"{'-' if rss is None else f'{rss:.0f}':>8} {'-' if gpu is None else f'{gpu / 2**20:.0f}':>8} "
              f"{'-' if merge is None else f'{100 * merge:.2f}%':>9} "
              f"{r['initial_loss']:>7.4f} {r['loss_at_equal_steps']:>8.4f}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", required=True, help="output file ('-' for stdout in --child mode)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--sizes", type=lambda s: s.split(","), default=["small", "medium", "large"])
    ap.add_argument("--methods", type=lambda s: s.split(","), default=METHODS)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--window", type=int, default=4)
    ap.add_argument("--quant", choices=["none", "nf4", "fp4"], default="none",
                    help="hold every method's base in 4 bits (QLoRA); full fine-tuning is left out")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                    help="weights and compute (4-bit: compute dtype); bf16 backward is slow on CPUs without bf16 units")
    ap.add_argument("--seq", type=int, default=0, help="sequence length (0: the size's)")
    ap.add_argument("--batch", type=int, default=0, help="sequences per step (0: the size's)")
    ap.add_argument("--activation-checkpointing", action="store_true", help="recompute each decoder block in backward")
    ap.add_argument("--no-rss", dest="rss", action="store_false", help="skip the per-method child processes")
    ap.add_argument("--prefill-links", type=int, default=0,
                    help="time RAC-LoRA with the factored chain of link N (bf16/4-bit bases; random factors)")
    ap.add_argument("--chain-budget", type=lambda v: None if v in ("none", "null") else float(v), default=0.1,
                    help="raclora.chain_budget for --prefill-links ('none': the exact chain)")
    ap.add_argument("--workers", action="store_true", help="also FSDP2 scaling, 1 vs 2 workers")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
    if args.child:
        return run_child(args)
    if args.quant != "none":
        args.methods = [m for m in args.methods if m != "full"]  # 4-bit weights cannot be trained
    out = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                       "device": args.device, "cuda": torch.cuda.get_device_name() if args.device == "cuda" else None},
           "settings": {k: v for k, v in vars(args).items() if k not in ("json", "child")}, "sizes": {}}
    for size in args.sizes:
        out["sizes"][size] = bench_size(size, args)
        print_table(size, out["sizes"][size])
    if args.workers:
        out["scaling"] = scaling(args)
        print(f"\nFSDP2 (raclora train, quickstart): 1 worker {out['scaling']['fsdp2_x1']['tokens_per_s']:.0f} tokens/s, "
              f"2 workers {out['scaling']['fsdp2_x2']['tokens_per_s']:.0f} ({out['scaling']['scaling_2_vs_1']:.2f}x)")
    write_json(args.json, out)


if __name__ == "__main__":
    main()
