"""Assembles what a run trains: tokenizer, base model, injected layers and the chain."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from raclora_dist.config import ConfigError, RunConfig
from raclora_dist.core import RacLoraChain, RacLoraLinear, RankError, TargetError, inject
from raclora_dist.train.model import build_base_model
from raclora_dist.train.tokenizer import load_tokenizer


@dataclass
class Session:
    """A model with RAC-LoRA layers injected, and its chain."""

    model: nn.Module
    tokenizer: object
    layers: dict[str, RacLoraLinear]
    chain: RacLoraChain


def base_folder(cfg: RunConfig, run_dir: Path) -> Path:
    """Where the untouched base lives: the run's ``base/`` (built from config) or the source."""
    return Path(run_dir) / "base" if cfg.model.config is not None else Path(cfg.model.name_or_path)


def inject_checked(model: nn.Module, cfg: RunConfig) -> dict[str, RacLoraLinear]:
    """:func:`inject`, with target and rank problems reported as config errors."""
    try:
        return inject(model, cfg.raclora)
    except (TargetError, RankError) as err:
        raise ConfigError(str(err)) from None


def validate_model(cfg: RunConfig) -> int:
    """Builds the model on the meta device and injects: catches target/rank errors cheaply.

    Returns:
        The number of layers that would be wrapped.
    """
    tok = load_tokenizer(cfg.data.tokenizer)
    if cfg.model.quantization.enabled:
        # Nothing is quantized on the meta device, so dense layers stand in for the 4-bit
        # ones; the 4-bit-only options were already checked with the config.
        cfg = cfg.model_copy(update={"raclora": cfg.raclora.model_copy(
            update={"master_weights": "none", "stochastic_rounding": False})})
    with torch.device("meta"):
        if cfg.model.name_or_path is not None:
            from transformers import AutoConfig, AutoModelForCausalLM

            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(cfg.model.name_or_path))
        else:
            model = build_base_model(cfg.model, len(tok))
        return len(inject_checked(model, cfg))


def build_session(cfg: RunConfig, source: Path | None = None, save_base_to: Path | None = None) -> Session:
    """Builds tokenizer, base model (fresh or from ``source``), quantizes it if the config
    says so, and injects the chain. The saved base is the original (unquantized) one.

    Args:
        cfg: the run config.
        source: load the base from this folder (a run's ``base/``) instead of building it.
        save_base_to: save the untouched base and tokenizer here before injecting.
    """
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    model = build_base_model(cfg.model, len(tokenizer), source)
    if save_base_to is not None:
        from raclora_dist.train.model import save_base

        save_base(model, tokenizer, save_base_to)
    q = cfg.model.quantization
    if q.enabled:  # before any engine shards the model: engines then shard the packed codes
        from raclora_dist.quant.bnb import drop_sources, quantize_model

        quantize_model(model, q, q.storage, keep_source=cfg.raclora.master_weights != "none")
    layers = inject_checked(model, cfg)
    if q.enabled:
        drop_sources(model)
    return Session(model, tokenizer, layers, RacLoraChain(layers, cfg.raclora.on_nonfinite))
