#!/usr/bin/env bash
# The GPU measurements of docs/benchmarks.md ("On a GPU"), in one command:
#   bash scripts/gpu_bench.sh [OUT_DIR]          (default: benchmarks/results/gpu)
# Run from the repository root on a machine with an NVIDIA GPU and torch, transformers, peft,
# bitsandbytes, pydantic installed (the package itself on PYTHONPATH is enough). Each step has
# its own time limit and log, and a failed step does not stop the next.
#  0. the tests marked gpu (tests/gpu: NCCL, bitsandbytes' CUDA kernels, bf16, FSDP2 cpu_offload),
#     which skip on CPU machines (needs pytest on the GPU machine);
#  1. smoke: configs/qlora.yaml with the GPU settings its header names, on one GPU;
#  2. QLoRA on a Llama-3-8B-shaped model: PEFT LoRA vs RAC-LoRA over the same NF4 base, bf16,
#     activation checkpointing, one process (benchmarks.throughput);
#  3. the same with the chain of link 64 (pre-filled to its cap: chain_budget 0.1, chain_links 3, bf16):
#     a long run's step against PEFT's (issue 27's target: >= 1.05x PEFT's tokens/s, <= 1.0x its peak);
#  4. the same shapes through `raclora train`: built from config, NF4 on load, FSDP2
#     (benchmarks.scale --device cuda).
set -u
out=${1:-benchmarks/results/gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
py=${PYTHON:-python3}
step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - t0)) s"
  tail -n 12 "$out/$name.log"
}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $py -c 'import torch, transformers, peft, bitsandbytes; print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__, "peft", peft.__version__, "bitsandbytes", bitsandbytes.__version__)'
} >"$out/env.txt" 2>&1
cat "$out/env.txt"

step gpu_tests "${TESTS_S:-240}" $py -m pytest -q -m gpu tests/gpu -p no:cacheprovider
step smoke "${SMOKE_S:-150}" $py -m raclora_dist train configs/qlora.yaml ray.enabled=false distributed.workers=1 \
  model.quantization.compute_dtype=bfloat16 distributed.mixed_precision=bf16 train.activation_checkpointing=true \
  raclora.links=2 raclora.steps_per_link=5 "run.dir=${TMPDIR:-/tmp}/raclora-gpu-smoke"
cp "${TMPDIR:-/tmp}/raclora-gpu-smoke/metrics.jsonl" "$out/smoke_metrics.jsonl" 2>/dev/null
step qlora_8b "${QLORA_S:-240}" $py -m benchmarks.throughput --device cuda --dtype bfloat16 --quant nf4 --sizes 8b \
  --methods peft_lora,rac_right --rank 16 --alpha 32 --lr 1e-4 --batch 2 --activation-checkpointing \
  --warmup 2 --rounds 3 --window 3 --no-rss --json "$out/qlora_8b.json"
step qlora_8b_link64 "${QLORA64_S:-240}" $py -m benchmarks.throughput --device cuda --dtype bfloat16 --quant nf4 \
  --sizes 8b --methods peft_lora,rac_right --rank 16 --alpha 32 --lr 1e-4 --batch 2 --activation-checkpointing \
  --warmup 2 --rounds 3 --window 3 --no-rss --prefill-links 64 --json "$out/qlora_8b_link64.json"
step train_8b "${TRAIN_S:-1800}" $py -m benchmarks.scale --device cuda --size 8b --batch 2 --steps 6 \
  --cases "${TRAIN_CASES:-fsdp2-nf4-ckpt}" --json "$out/train_8b.json"
