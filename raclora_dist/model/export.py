"""Exports a trained chain: a standard PEFT LoRA adapter, or a merged HF model folder.

T merged links of rank r form one LoRA of rank T*r over the *original* base (see
``core.lowrank``), so the adapter loads with plain ``peft`` onto the untouched base, in
either merge mode; for a 4-bit run, onto the base loaded in 4 bits with the
``BitsAndBytesConfig`` the export report gives (exact for ``factored``, the mode that never
touches the 4-bit codes). The merged export of a 4-bit run rebuilds the trained model and
writes its effective weights (dequantized base plus chain) in fp32.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import cast

import torch

from raclora_dist.checkpoint.folder import Checkpoint, damaged_checkpoints, find_latest, load_checkpoint
from raclora_dist.config import ConfigError, RunConfig, build_config, read_yaml
from raclora_dist.core import chain_of_links, compress_lora, concat_links, link_factors
from raclora_dist.core.dtypes import torch_dtype
from raclora_dist.core.layer import auto_merge_mode, resolve_chain_dtype
from raclora_dist.model.session import base_folder


def _load_run(run_dir: Path) -> tuple[Checkpoint, Path, RunConfig]:
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{str(run_dir)!r} is not a run folder (no config.yaml)")
    cfg = build_config(read_yaml(run_dir / "config.yaml"), str(run_dir / "config.yaml"), saved=True)
    path = find_latest(run_dir)
    if path is None:
        damaged = damaged_checkpoints(run_dir)
        listed = "".join(f"; {name} is damaged: {', '.join(p)}" for name, p in damaged.items())
        raise ConfigError(f"{str(run_dir)!r} has no complete, intact checkpoint to export{listed}")
    ckpt = load_checkpoint(path)
    if not ckpt.chain.merged:
        raise ConfigError(f"{path}: the chain has no merged links to export")
    return ckpt, base_folder(cfg, run_dir).resolve(), cfg


def base_rounds(cfg: RunConfig) -> bool:
    """Whether a merge into the run's base rounds, as ``RacLoraLinear.rounds_merges`` judges a
    layer: a 4-bit base, or one stored below fp32."""
    return cfg.model.quantization.enabled or cfg.model.dtype != "float32"


def merge_mode(cfg: RunConfig) -> str:
    """The run's merge mode with ``auto`` resolved as the layers resolve it (``auto_merge_mode``)."""
    rc = cfg.raclora
    if rc.merge_mode != "auto":
        return rc.merge_mode
    return auto_merge_mode(packed=cfg.model.quantization.enabled, rounds=base_rounds(cfg),
                           master_weights=rc.master_weights, stochastic_rounding=rc.stochastic_rounding)


def chain_lora(ckpt: Checkpoint, cfg: RunConfig, rank: int | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """Per module: ``(B (m, R), A (R, n), discarded_energy)`` with ``B @ A`` the update the trained
    model applies: every link (R = links x r), or for a capped factored chain the chain as
    training recompressed it (R at most the cap); then compressed to ``rank`` if given, with the
    share of the update's energy that compression drops (0 without ``rank``)."""
    factored = merge_mode(cfg) == "factored"
    dtype = resolve_chain_dtype(cfg.raclora.chain_dtype, rounds=base_rounds(cfg))
    out = {}
    for spec in ckpt.layer_specs():
        links = link_factors(spec, ckpt.chain)
        cap = cfg.raclora.chain_capacity(spec.out_features, spec.in_features)
        if factored:  # the chain as training held it: recompressed past its cap, rounded to its dtype
            B, A, _ = chain_of_links(links, spec.scale, min(cap, sum(A.shape[0] for _, A in links)), dtype)
        else:
            B, A = concat_links(links, spec.scale)
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

    ckpt, base, run_cfg = _load_run(run_dir)
    out = Path(out or Path(run_dir) / "export" / "peft")
    lora = chain_lora(ckpt, run_cfg, rank)
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
    q = run_cfg.model.quantization
    if q.enabled:
        from raclora_dist.quant.bnb import hf_quantization_config

        # Load the base with transformers.BitsAndBytesConfig(**this) to get the 4-bit base the run trained on.
        report["bnb_quantization_config"] = hf_quantization_config(q)
        report["merge_mode"] = merge_mode(run_cfg)
        report["exact_on_4bit_base"] = report["merge_mode"] == "factored"
    (out / "raclora_export.json").write_text(json.dumps(report, indent=1))
    return out


def export_merged(run_dir: Path, out: Path | None = None, dtype: str = "auto") -> Path:
    """Writes a Hugging Face model folder with the whole chain merged into the base weights.

    Args:
        dtype: the saved weights' dtype; ``auto`` keeps the base's (float32 for the
            dequantized layers of a 4-bit run). Merging happens in float32 either way.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt, base, run_cfg = _load_run(run_dir)
    out = Path(out or Path(run_dir) / "export" / "merged")
    if run_cfg.model.quantization.enabled:
        model = _dequantized_trained_model(run_cfg, base, ckpt)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(base), dtype="auto")
        with torch.no_grad():
            for name, (B, A, _) in chain_lora(ckpt, run_cfg).items():
                w = cast(torch.Tensor, model.get_submodule(name).weight)
                w.copy_((w.float() + B @ A).to(w.dtype))
    if dtype != "auto":
        model = model.to(torch_dtype(dtype))
    model.save_pretrained(out)
    with contextlib.suppress(OSError, ValueError):  # a base folder without a tokenizer: the weights still export
        AutoTokenizer.from_pretrained(str(base)).save_pretrained(out)
    return out


def _dequantized_trained_model(cfg: RunConfig, base: Path, ckpt: Checkpoint):
    """The trained 4-bit model rebuilt (base quantized as in the run, chain replayed) with
    every 4-bit layer turned into a dense fp32 ``nn.Linear`` of its effective weight."""
    from raclora_dist.model.session import build_session
    from raclora_dist.quant.bnb import dequantize_model

    session = build_session(cfg, source=base)
    session.chain.replay(ckpt.chain)
    dequantize_model(session.model)
    return session.model
