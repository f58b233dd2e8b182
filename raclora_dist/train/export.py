"""Exports a trained chain: a standard PEFT LoRA adapter, or a merged HF model folder.

T merged links of rank r form one LoRA of rank T*r over the *original* base (see
``core.export``), so the adapter loads with plain ``peft`` onto the untouched base, in
either merge mode. Only the checkpoint and the base folder are read; raclora layers are
not rebuilt.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from raclora_dist.config import ConfigError, build_config, read_yaml
from raclora_dist.core import compress_lora, concat_links, link_factors
from raclora_dist.train.checkpoint import Checkpoint, find_latest, load_checkpoint
from raclora_dist.train.session import base_folder


def _load_run(run_dir: Path) -> tuple[Checkpoint, Path]:
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{str(run_dir)!r} is not a run folder (no config.yaml)")
    cfg = build_config(read_yaml(run_dir / "config.yaml"), str(run_dir / "config.yaml"))
    path = find_latest(run_dir)
    if path is None:
        raise ConfigError(f"{str(run_dir)!r} has no complete checkpoint to export")
    ckpt = load_checkpoint(path)
    if not ckpt.chain.merged:
        raise ConfigError(f"{path}: the chain has no merged links to export")
    return ckpt, base_folder(cfg, run_dir).resolve()


def chain_lora(ckpt: Checkpoint, rank: int | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """Per module: ``(B (m, R), A (R, n), discarded_energy)`` with ``B @ A`` the whole chain."""
    out = {}
    for spec in ckpt.layer_specs():
        B, A = concat_links(link_factors(spec, ckpt.chain), spec.scale)
        out[spec.name] = compress_lora(B, A, rank) if rank else (B, A, 0.0)
    return out


def export_peft(run_dir: Path, out: Path | None = None, rank: int | None = None) -> Path:
    """Writes ``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT LoRA).

    Args:
        run_dir: the run folder. out: target folder (default ``RUN/export/peft``).
        rank: compress each module's chain to this rank by SVD (default: keep links x r).

    The scale is folded into ``lora_B``; ``lora_alpha = r`` makes PEFT's scale 1.
    """
    from peft import LoraConfig
    from safetensors.torch import save_file

    ckpt, base = _load_run(run_dir)
    out = Path(out or Path(run_dir) / "export" / "peft")
    lora = chain_lora(ckpt, rank)
    ranks = {name: B.shape[1] for name, (B, _, _) in lora.items()}
    r = max(ranks.values())
    cfg = LoraConfig(
        r=r, lora_alpha=r, target_modules=sorted(lora), lora_dropout=0.0, bias="none",
        task_type="CAUSAL_LM", base_model_name_or_path=str(base),
        rank_pattern={n: k for n, k in ranks.items() if k != r},
        alpha_pattern={n: k for n, k in ranks.items() if k != r},
    )
    out.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(str(out))
    tensors = {}
    for name, (B, A, _) in lora.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = A.contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = B.contiguous()
    save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
    report = {"links": ckpt.chain.merged, "rank": r, "discarded_energy": {n: d for n, (_, _, d) in lora.items()}}
    (out / "raclora_export.json").write_text(json.dumps(report, indent=1))
    return out


def export_merged(run_dir: Path, out: Path | None = None) -> Path:
    """Writes a Hugging Face model folder with the whole chain merged into the base weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt, base = _load_run(run_dir)
    out = Path(out or Path(run_dir) / "export" / "merged")
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype="auto")
    with torch.no_grad():
        for name, (B, A, _) in chain_lora(ckpt).items():
            w = model.get_submodule(name).weight
            w.copy_((w.float() + B @ A).to(w.dtype))
    model.save_pretrained(out)
    try:
        AutoTokenizer.from_pretrained(str(base)).save_pretrained(out)
    except (OSError, ValueError):  # a base folder without a tokenizer: the weights still export
        pass
    return out
