"""Large-model path: load memory per worker, activation checkpointing, time to first step.

Usage: python -m benchmarks.scale --json OUT [--size 0.79b] [--before REF] [--cases fsdp2,zero3,fsdp2-nf4]
       python -m benchmarks.scale --json OUT --device cuda [--size 8b] [--workers N]

On GPUs (``--device cuda``): ``raclora train`` of a model built from config (Llama-3-8B's
shapes by default) in bf16 with an NF4 base quantized on the GPU as it loads, FSDP2 over
``--workers`` GPUs, with and without activation checkpointing at ``--seq`` (default 2048)
tokens; per-rank peak GPU memory, load time, time to first step and tokens/s from the run's
metrics. The PEFT QLoRA baseline on the same shapes is ``benchmarks.throughput --device cuda``.

On CPUs:

1. Writes a Llama-style model built from a config as a sharded fp32 safetensors folder (a
   stand-in for a pretrained checkpoint; streamed, never whole in memory).
2. Loads it through ``model.name_or_path`` with 2 workers per engine case (``raclora train``,
   torchrun, 1 link of 1 step) and reads each worker's startup record: peak RSS from start to
   the end of the first optimizer step, minus its RSS right after imports, as a multiple of
   the checkpoint's size. ``--before REF`` runs the same cases with the code of a git ref
   (a worktree) for comparison; that code has no startup record, so its rank 0's peak (the
   first step record's ``rss_mb``) is taken above this run's median after-imports RSS.
3. In one process at ``--act-seq`` tokens (default 1024), with and without
   ``train.activation_checkpointing``: the memory the autograd graph holds after the forward
   (RSS with 1 MiB+ allocations mapped, so freed ones leave), the peak of forward + backward
   above the loaded model, and tokens/s of full optimizer steps.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from benchmarks import proc_status_kb, write_json
from raclora_dist.train.callbacks import Callback

ROOT = Path(__file__).resolve().parents[1]

# name -> llama config fields (untied embeddings, like Llama 2 / 3)
SIZES = {
    "0.79b": {"hidden_size": 2048, "intermediate_size": 5504, "num_hidden_layers": 13, "num_attention_heads": 16,
              "num_key_value_heads": 16, "vocab_size": 32000},
    "8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 8, "vocab_size": 128256, "rope_theta": 500000.0},
    "tiny": {"hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 4, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 512},
}
ZERO3 = ["distributed.strategy=deepspeed", "distributed.deepspeed={zero_optimization: {stage: 3}}"]
CASES = {
    "fsdp2": ["distributed.strategy=fsdp2"],
    "zero3": ZERO3,
    # ZeRO-3 as it runs on GPUs: the next block prefetched and one block kept for reuse (the
    # CPU default prefetches and keeps nothing; backends/deepspeed.fill_stage3_limits). The
    # numbers are the 0.79 B model's block (50.6 M parameters; the bucket is DeepSpeed's 5e7 cap)
    "zero3-prefetch": [ZERO3[0], "distributed.deepspeed={zero_optimization: {stage: 3, "
                       "stage3_prefetch_bucket_size: 50000000, stage3_max_reuse_distance: 50600000}}"],
    "fsdp2-nf4": ["distributed.strategy=fsdp2", "model.quantization=nf4"],
    "fsdp2-linear": ["distributed.strategy=fsdp2", "distributed.fsdp_unit=linear"],
    "fsdp2-block": ["distributed.strategy=fsdp2", "distributed.fsdp_unit=block"],  # auto is sublayer here
}
# the same with activation checkpointing, as large-model runs are configured
CASES.update({f"{name}-ac": [*extra, "train.activation_checkpointing=true"] for name, extra in list(CASES.items())})


STEPS = 3  # the first step's peak is the measure; later ones show the steady state (ZeRO-3 traces step 1)


class PhasePeaks(Callback):
    """Appends to ``out`` (JSON lines, every rank) the process's peak RSS so far (``VmHWM``, never
    reset: the trainer's own records read the same peak) and its RSS now, after each step, before
    and after the boundary, after the checkpoint and at the end: where the whole run's peak is
    reached."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)

    def _write(self, trainer, phase: str) -> None:
        line = {"rank": trainer.backend.info.rank, "phase": phase, "step": trainer.global_step,
                "peak_rss_mb": proc_status_kb("VmHWM") / 1024, "rss_mb": proc_status_kb("VmRSS") / 1024}
        with open(self.out, "a") as f:
            f.write(json.dumps(line) + "\n")

    def on_step_end(self, trainer, record: dict) -> None:
        self._write(trainer, "step")

    def before_boundary(self, trainer, link: int) -> None:
        self._write(trainer, "before boundary")

    def on_boundary(self, trainer, record: dict) -> None:
        self._write(trainer, "boundary")

    def on_checkpoint(self, trainer, folder: Path, record: dict) -> None:
        self._write(trainer, "checkpoint")

    def on_train_end(self, trainer) -> None:
        self._write(trainer, "end")


def model_config(size: str, seq: int) -> dict:
    return {"model_type": "llama", **SIZES[size], "max_position_embeddings": max(seq, 2048),
            "tie_word_embeddings": False}


def write_checkpoint(size: str, folder: Path, seq: int) -> dict:
    """Streams a from-config model (keyed init, seed 0) into a sharded fp32 folder."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from raclora_dist.model.weights import InitFromConfig, state_shapes, write_safetensors

    fields = model_config(size, seq)
    cfg = AutoConfig.for_model(fields.pop("model_type"), **fields)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    shapes = state_shapes(meta)
    nbytes = sum(s.numel() * d.itemsize for s, d in shapes.values())
    t0 = time.perf_counter()
    files = write_safetensors(InitFromConfig(meta, 0), shapes, folder, max_shard_bytes=max(nbytes // 4 + 1, 1 << 20))
    cfg.save_pretrained(folder)
    return {"params": sum(s.numel() for s, _ in shapes.values()), "bytes": nbytes, "files": len(files),
            "write_s": time.perf_counter() - t0}


def run_config(folder: Path, run: Path, workers: int, seq: int, batch: int) -> dict:
    return {
        "model": {"name_or_path": str(folder), "dtype": "float32"},
        "data": {"path": str(ROOT / "data" / "stdlib_docstrings.jsonl"), "tokenizer": "bytes", "seq_len": seq,
                 "max_documents": 400, "eval_fraction": 0.05},
        "raclora": {"rank": 8, "alpha": 16, "links": 1, "steps_per_link": STEPS, "seed": 0,
                    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]},
        "train": {"batch_size": batch, "lr": 1e-3, "eval_batches": 0},
        "checkpoint": {"every_links": 1, "keep": 1},
        "distributed": {"strategy": "fsdp2", "workers": workers},
        "run": {"dir": str(run), "callbacks": [{"class": "benchmarks.scale:PhasePeaks",
                                                 "args": {"out": str(run / "phase_peaks.jsonl")}}]},
    }


def train(code: Path, cfg: dict, run: Path, extra: list[str]) -> list[dict]:
    """``raclora train`` from ``code`` (a checkout); returns the run's metrics records."""
    run.mkdir(parents=True, exist_ok=True)
    path = run.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(code), os.environ.get("PYTHONPATH")])),
           "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "raclora_dist", "train", str(path), *extra],
                          capture_output=True, text=True, cwd=code, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(extra)} failed:\n{proc.stderr[-4000:]}")
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def load_case(name: str, records: list[dict], ckpt_mb: float, phases: list[dict] | None = None) -> dict:
    st = next(r for r in records if r["type"] == "startup")
    above = [p - s for p, s in zip(st["peak_rss_mb_first_step"], st["rss_mb_start"], strict=False)]
    loaded = [p - s for p, s in zip(st["peak_rss_mb_loaded"], st["rss_mb_before_load"], strict=False)]
    steps = [r for r in records if r["type"] == "step"]
    # rank 0's peak through the last step (a step record's rss_mb is its peak so far)
    later = steps[-1]["rss_mb"] - st["rss_mb_start"][0]
    return {"case": name, "load_s": st["load_s"], "first_step_s": st["first_step_s"],
            "rss_mb_start": st["rss_mb_start"], "peak_rss_mb_first_step": st["peak_rss_mb_first_step"],
            "peak_above_start_mb": above, "x_checkpoint": [a / ckpt_mb for a in above],
            "load_growth_x_checkpoint": [a / ckpt_mb for a in loaded], "tokens_per_s": steps[0]["tokens_per_s"],
            "steps": len(steps), "x_checkpoint_through_last_step_rank0": later / ckpt_mb,
            "tokens_per_s_later": [r["tokens_per_s"] for r in steps[1:]],
            **whole_run(phases or [], st["rss_mb_start"], ckpt_mb)}


def whole_run(phases: list[dict], start_mb: list[float], ckpt_mb: float) -> dict:
    """Each rank's peak over the whole run (steps, boundary, checkpoint) above its start RSS, as a
    multiple of the checkpoint, and the phase in which that peak was reached."""
    if not phases:
        return {}
    out: dict = {"x_checkpoint_whole_run": [], "whole_run_peak_phase": [], "phase_peaks": phases}
    for rank, start in enumerate(start_mb):
        mine = [p for p in phases if p["rank"] == rank]
        peak = max(p["peak_rss_mb"] for p in mine)
        out["x_checkpoint_whole_run"].append((peak - start) / ckpt_mb)
        out["whole_run_peak_phase"].append(next(f"{p['phase']} (step {p['step']})" for p in mine
                                                if p["peak_rss_mb"] == peak))
    return out


def read_phases(run: Path) -> list[dict]:
    path = run / "phase_peaks.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def before_case(name: str, records: list[dict], ckpt_mb: float, start_mb: float) -> dict:
    step = next(r for r in records if r["type"] == "step")
    above = step["rss_mb"] - start_mb
    return {"case": name, "peak_rss_mb_first_step_rank0": step["rss_mb"], "peak_above_start_mb": [above],
            "x_checkpoint": [above / ckpt_mb], "tokens_per_s": step["tokens_per_s"]}


# -- GPUs: a config-built bf16 model, NF4 on load, FSDP2 ---------------------------------------
GPU_CASES = {
    "fsdp2-nf4": [],
    "fsdp2-nf4-ckpt": ["train.activation_checkpointing=true"],
}


def gpu_run_config(size: str, run: Path, workers: int, seq: int, batch: int, steps: int) -> dict:
    """A run of ``steps`` steps on a config-built ``size`` model in bf16, NF4 on load, FSDP2."""
    cfg = run_config(Path("unused"), run, workers, seq, batch * workers)
    cfg["model"] = {"config": model_config(size, seq), "dtype": "bfloat16",
                    "quantization": {"method": "nf4", "compute_dtype": "bfloat16"}}
    cfg["data"]["max_documents"] = 4000
    cfg["raclora"]["steps_per_link"] = steps
    cfg["distributed"] |= {"strategy": "fsdp2", "mixed_precision": "bf16"}
    return cfg


def gpu_case(name: str, records: list[dict]) -> dict:
    st = next(r for r in records if r["type"] == "startup")
    steps = [r for r in records if r["type"] == "step"]
    later = [r["tokens_per_s"] for r in steps[1:]] or [steps[0]["tokens_per_s"]]  # the first step warms up
    return {"case": name, "load_s": st["load_s"], "first_step_s": st["first_step_s"],
            "gpu_peak_mb_loaded": st.get("gpu_peak_mb_loaded"), "gpu_peak_mb_first_step": st.get("gpu_peak_mb_first_step"),
            "gpu_peak_mb": max(r.get("gpu_peak_mb", 0.0) for r in steps), "tokens_per_s": statistics.median(later),
            "steps": len(steps), "losses": [r["loss"] for r in steps]}


def run_gpu(args) -> dict:
    out = {"device": "cuda", "size": args.size, "model": model_config(args.size, args.seq), "workers": args.workers,
           "seq": args.seq, "batch_per_worker": args.batch, "cases": []}
    try:
        import torch

        out["gpu"] = torch.cuda.get_device_name()
    except Exception:
        pass
    for name in args.cases.split(","):
        with tempfile.TemporaryDirectory() as tmp:  # the saved config-built base is large: one at a time
            run = Path(tmp) / name
            cfg = gpu_run_config(args.size, run, args.workers, args.seq, args.batch, args.steps)
            case = gpu_case(name, train(ROOT, cfg, run, GPU_CASES[name]))
        out["cases"].append(case)
        print(f"{name}: load {case['load_s']:.0f} s, first step {case['first_step_s']:.0f} s after start, "
              f"{case['tokens_per_s']:.0f} tokens/s, peak GPU {case['gpu_peak_mb']:,.0f} MiB per rank", flush=True)
    return out


# -- activation checkpointing, one process -------------------------------------------------
def activation_child(folder: Path, ckpt: bool, seq: int, steps: int) -> dict:
    """In this process: memory of one forward/backward at ``seq`` tokens, then tokens/s."""
    import torch

    from raclora_dist.config import build_config, with_values
    from raclora_dist.model.heap import mapped_large_allocations
    from raclora_dist.model.session import build_session

    cfg = build_config(run_config(folder, Path(tempfile.gettempdir()) / "unused", 1, seq, 1)
                       | {"distributed": {"strategy": "single", "workers": 1}})
    cfg = with_values(cfg, {"train.activation_checkpointing": ckpt})
    torch.manual_seed(0)
    session = build_session(cfg)
    session.chain.start_link(0)
    params = [layer.factor for layer in session.layers.values()]
    opt = torch.optim.AdamW(params, lr=1e-4)
    batch = torch.randint(0, 256, (1, seq))
    with torch.no_grad():  # pages the mapped weights in: what follows is the training step's own
        session.model(batch[:, :8])
    session.model.train()
    out = {"activation_checkpointing": ckpt, "seq": seq}
    with mapped_large_allocations():  # freed activations go back to the OS: RSS is what is held
        gc.collect()
        before = proc_status_kb("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # peak (VmHWM) := current RSS
        loss = session.model(batch, labels=batch).loss
        out["held_after_forward_mb"] = (proc_status_kb("VmRSS") - before) / 1024
        loss.backward()
        out["peak_fwd_bwd_mb"] = (proc_status_kb("VmHWM") - before) / 1024
        opt.step()
        opt.zero_grad(set_to_none=True)
        del loss
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        session.model(batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    out["step_s"] = statistics.median(times)
    out["tokens_per_s"] = seq / out["step_s"]
    return out


def activation_case(folder: Path, ckpt: bool, seq: int, steps: int) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.scale", "--child", str(folder), "--act-seq", str(seq),
           "--act-steps", str(steps)] + (["--ckpt"] if ckpt else [])
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": path})
    if proc.returncode != 0:
        raise SystemExit(f"activation child failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def worktree(ref: str, where: Path) -> Path:
    subprocess.run(["git", "worktree", "add", "--detach", str(where), ref], cwd=ROOT, check=True, capture_output=True)
    return where


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--size", choices=sorted(SIZES), help="model shapes (default: 0.79b on CPU, 8b on cuda)")
    ap.add_argument("--cases", help="comma-separated (default: all): " + ", ".join(CASES) + "; cuda: " + ", ".join(GPU_CASES))
    ap.add_argument("--workers", type=int, help="workers (default: 2 on CPU, 1 GPU on cuda)")
    ap.add_argument("--seq", type=int, help="sequence length of the runs (default: 128 on CPU, 2048 on cuda)")
    ap.add_argument("--before", help="also run the cases with the code of this git ref (e.g. 3d3ecbe)")
    ap.add_argument("--act-seq", type=int, default=1024, help="sequence length of the activation measurement (0: skip)")
    ap.add_argument("--act-steps", type=int, default=2)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--batch", type=int, default=1, help="cuda: sequences per worker and step")
    ap.add_argument("--steps", type=int, default=6, help="cuda: optimizer steps per case")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    gpu = args.device == "cuda"
    args.size = args.size or ("8b" if gpu else "0.79b")
    args.cases = args.cases or ",".join(GPU_CASES if gpu else CASES)
    args.workers = args.workers or (1 if gpu else 2)
    args.seq = args.seq or (2048 if gpu else 128)
    if gpu:
        if not args.json:
            ap.error("--json is required")
        write_json(args.json, run_gpu(args))
        return
    if args.child:
        print(json.dumps(activation_child(Path(args.child), args.ckpt, args.act_seq, args.act_steps)))
        return
    if not args.json:
        ap.error("--json is required")
    cases = args.cases.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = tmp / "checkpoint"
        info = write_checkpoint(args.size, folder, max(args.seq, args.act_seq))
        ckpt_mb = info["bytes"] / 2**20
        print(f"{args.size}: {info['params'] / 1e9:.3f} B parameters, {ckpt_mb:.0f} MiB fp32 in {info['files']} "
              f"files (written in {info['write_s']:.0f} s)")
        out = {"size": args.size, "model": model_config(args.size, args.seq), "checkpoint": info,
               "workers": args.workers, "seq": args.seq, "after": [], "before": [], "activations": []}
        for name in cases:
            cfg = run_config(folder, tmp / f"after-{name}", args.workers, args.seq, args.workers)
            recs = train(ROOT, cfg, tmp / f"after-{name}", CASES[name])
            out["after"].append(load_case(name, recs, ckpt_mb, read_phases(tmp / f"after-{name}")))
        if args.before:
            code = worktree(args.before, tmp / "before-code")
            start = statistics.median(s for c in out["after"] for s in c["rss_mb_start"])
            try:
                for name in cases:
                    cfg = run_config(folder, tmp / f"before-{name}", args.workers, args.seq, args.workers)
                    cfg["run"].pop("callbacks")  # older code may not have the probe
                    recs = train(code, cfg, tmp / f"before-{name}", CASES[name])
                    out["before"].append(before_case(name, recs, ckpt_mb, start))
            finally:
                subprocess.run(["git", "worktree", "remove", "--force", str(code)], cwd=ROOT, capture_output=True)
            out["before_ref"] = args.before
        if args.act_seq:
            for ckpt in (False, True):
                out["activations"].append(activation_case(folder, ckpt, args.act_seq, args.act_steps))
    print_tables(out)
    write_json(args.json, out)


def print_tables(out: dict) -> None:
    print(f"\nload + first step, {out['workers']} workers, seq {out['seq']}: peak RSS above after-imports, "
          f"as x checkpoint ({out['checkpoint']['bytes'] / 2**20:.0f} MiB)")
    print(f"{'case':10} {'code':7} {'x ckpt per rank':>18} {'MiB per rank':>16} {'load s':>7} {'1st step s':>10}"
          f" {'x ckpt to step ' + str(STEPS):>16} {'x ckpt whole run':>16} {'tokens/s after':>14}")
    for code in ("before", "after"):
        for c in out[code]:
            xs = " ".join(f"{x:.2f}" for x in c["x_checkpoint"])
            mb = " ".join(f"{m:.0f}" for m in c["peak_above_start_mb"])
            load = f"{c['load_s']:.1f}" if "load_s" in c else "-"
            first = f"{c['first_step_s']:.1f}" if "first_step_s" in c else "-"
            later = f"{c['x_checkpoint_through_last_step_rank0']:.2f}" if "steps" in c else "-"
            speed = " ".join(f"{t:.1f}" for t in c.get("tokens_per_s_later", [])) or "-"
            whole = " ".join(f"{x:.2f}" for x in c.get("x_checkpoint_whole_run", [])) or "-"
            print(f"{c['case']:10} {code:7} {xs:>18} {mb:>16} {load:>7} {first:>10} {later:>16} {whole:>16} {speed:>14}")
            if "whole_run_peak_phase" in c:
                print(f"{'':18} whole-run peak reached at: {'; '.join(c['whole_run_peak_phase'])}")
    if out["activations"]:
        a = {c["activation_checkpointing"]: c for c in out["activations"]}
        print(f"\nactivations, 1 process, seq {out['activations'][0]['seq']}, batch 1")
        print(f"{'checkpointing':14} {'held after fwd MiB':>18} {'peak fwd+bwd MiB':>16} {'tokens/s':>9}")
        for k in (False, True):
            c = a[k]
            print(f"{k!s:14} {c['held_after_forward_mb']:>18.0f} {c['peak_fwd_bwd_mb']:>16.0f} {c['tokens_per_s']:>9.1f}")
        if a[False]["held_after_forward_mb"] > 0:
            print(f"held with / without: {a[True]['held_after_forward_mb'] / a[False]['held_after_forward_mb']:.2f}x")


if __name__ == "__main__":
    main()
